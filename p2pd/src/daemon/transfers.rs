//! File transfer commands: offering files and directories, accepting
//! them (into a new directory, resuming from a kept part file), finding
//! transfers by id prefix, and how `transfers` shows them.

use super::*;
use std::collections::VecDeque;

/// Most files one directory send may hold.
const MAX_DIR_FILES: usize = 10_000;

impl Daemon {
    pub(super) fn send_file(
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
        let piece_size = piece_size(&path, meta.len())?;
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
            piece_size,
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
    pub(super) fn send_dir(
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
        // Every file's piece size first: a file too large fails the
        // command before anything is offered.
        let mut sized = Vec::with_capacity(list.len());
        for (path, rel) in list {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let piece_size = piece_size(&path, len)?;
            sized.push((path, rel, len, piece_size));
        }
        let group = self.new_transfer_id()?;
        let n = sized.len() as u32;
        let mut size = 0;
        for (path, rel, len, piece_size) in sized {
            size += len;
            let id = self.new_transfer_id()?;
            self.groups.insert(id, group);
            self.node.io_mut().hash(
                id,
                peer.clone(),
                path,
                format!("{top}/{rel}"),
                (group, n),
                piece_size,
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

    pub(super) fn new_transfer_id(&self) -> Result<u64, ControlError> {
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
    pub(super) fn group_of(&self, id: u64) -> Option<String> {
        self.groups
            .get(&id)
            .filter(|g| **g != 0)
            .map(|g| hex_id(*g))
    }

    pub(super) fn accept_file(
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
        check_space(&dir, row.size)?;
        self.accept_into(now, &row, &dir, &name)?;
        json(&self.transfer_info(&self.transfer_row(row.id)?))
    }

    /// Takes directory `group` into a new directory under `dir` (its name,
    /// numbered if taken): only once every file it announced is offered,
    /// and only those (an offer for it later is refused), if they fit in
    /// the free space.
    pub(super) fn accept_group(
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
        let announced = members.first().map_or(0, |t| t.group_files) as usize;
        let first = members.first();
        if members.len() < announced {
            // Still arriving: taken once every file it announced is here
            // (and only those), checked for space then.
            self.store
                .set_setting(
                    &format!("group_accept:{}", hex_id(group)),
                    &dir.display().to_string(),
                )
                .map_err(internal)?;
            tracing::info!(group = %hex_id(group), have = members.len(), announced, "TRANSFER(DIRECTORY_ACCEPT_WHEN_COMPLETE)");
            return json(&TransferInfo {
                id: hex_id(group),
                peer: first.map(|t| t.peer.clone()).unwrap_or_default(),
                direction: Direction::In,
                name: first
                    .map(|t| files::sanitize_path(&t.name)[0].clone())
                    .unwrap_or_default(),
                size: members.iter().map(|t| t.size).sum(),
                done: 0,
                state: TransferState::Offered,
                rate: None,
                eta_s: None,
                path: None,
                reason: Some(format!(
                    "accepted: starts once all {announced} files are offered ({} so far)",
                    members.len()
                )),
                group: Some(hex_id(group)),
                files: first.map(|t| t.group_files),
            });
        }
        let need: u64 = members
            .iter()
            .filter(|t| t.state == TransferState::Offered)
            .map(|t| t.size)
            .sum();
        check_space(dir, need)?;
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
    pub(super) fn accept_member(
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
    pub(super) fn accept_into(
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
        if !self.node.accept_file(now, &row.peer, row.tid(), &have) {
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
    pub(super) fn find_group(&self, id: &str, incoming: bool) -> Result<Option<u64>, ControlError> {
        let want = id.trim().to_ascii_lowercase();
        let Some(range) = prefix_range(&want) else {
            return Ok(None);
        };
        let groups = self.store.groups_in(range, incoming).map_err(internal)?;
        if groups.len() > 1 {
            return Err(err(
                ErrorCode::NoTransfer,
                format!("{want} names more than one directory; give more digits"),
            ));
        }
        Ok(groups.first().copied())
    }

    /// A transfer by its whole id.
    pub(super) fn transfer_row(&self, id: u64) -> Result<TransferRow, ControlError> {
        self.store
            .transfer(id)
            .map_err(internal)?
            .ok_or_else(|| err(ErrorCode::NoTransfer, format!("no transfer {}", hex_id(id))))
    }

    /// A transfer by id, or by a prefix (four hex digits or more) that
    /// names exactly one.
    pub(super) fn find_transfer(&self, id: &str) -> Result<TransferRow, ControlError> {
        let id = id.trim().to_ascii_lowercase();
        let Some(range) = prefix_range(&id) else {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{id:?} is not a transfer id (4 to 16 hex digits)"),
            ));
        };
        // An index range, not a scan: the ids a prefix names are one
        // interval.
        let rows = self.store.transfers_in(range).map_err(internal)?;
        let mut hits = rows.into_iter();
        match (hits.next(), hits.next()) {
            (Some(t), None) => Ok(t),
            (Some(_), Some(_)) => Err(err(
                ErrorCode::NoTransfer,
                format!("{id} names more than one transfer; give more digits"),
            )),
            (None, _) => Err(err(ErrorCode::NoTransfer, format!("no transfer {id}"))),
        }
    }

    /// A page of transfers, newest first: `limit` (at most
    /// [`MAX_TRANSFERS_PAGE`]) from `offset`. One indexed query and one
    /// look at the live transfers, whatever the number of records.
    pub(super) fn transfer_list(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<TransferInfo>, ControlError> {
        let (rows, _total) = self
            .store
            .transfers_page(limit.min(MAX_TRANSFERS_PAGE), offset)
            .map_err(internal)?;
        Ok(self.infos(&rows))
    }

    /// How `rows` are shown, with one look at the live transfers for all.
    pub(super) fn infos(&self, rows: &[TransferRow]) -> Vec<TransferInfo> {
        let live: std::collections::HashMap<u64, proto::TransferStatus> = self
            .node
            .transfer_status()
            .into_iter()
            .map(|(_, s)| (s.id.0, s))
            .collect();
        rows.iter()
            .map(|t| self.info_with(t, live.get(&t.id)))
            .collect()
    }

    pub(super) fn transfer_info(&self, t: &TransferRow) -> TransferInfo {
        let live = self.node.transfer_of(&t.peer, t.tid());
        self.info_with(t, live.as_ref())
    }

    fn info_with(&self, t: &TransferRow, live: Option<&proto::TransferStatus>) -> TransferInfo {
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
            (Some(s), TransferState::Active) if s.phase == proto::Phase::Finishing => {
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

    pub(super) fn rate(&self, id: u64) -> Option<f64> {
        self.progress.get(&id).and_then(rate)
    }

    pub(super) fn note_progress(&mut self, now: Instant, id: u64, done: u64) {
        note(self.progress.entry(id).or_default(), now, done);
    }
}

/// Bytes per second over `samples` (time, bytes done), once they span
/// more than a fifth of a second.
fn rate(samples: &VecDeque<(Instant, u64)>) -> Option<f64> {
    let (first, last) = (samples.front()?, samples.back()?);
    let dt = last.0.saturating_duration_since(first.0).as_secs_f64();
    (dt > 0.2).then(|| last.1.saturating_sub(first.1) as f64 / dt)
}

/// Adds a sample, and forgets those older than [`RATE_WINDOW`].
fn note(samples: &mut VecDeque<(Instant, u64)>, now: Instant, done: u64) {
    samples.push_back((now, done));
    while samples
        .front()
        .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
    {
        samples.pop_front();
    }
}

/// Most transfers one `transfers` page shows.
pub(super) const MAX_TRANSFERS_PAGE: u32 = 1_000;

/// The ids a hex prefix (4 to 16 digits) names: one interval.
fn prefix_range(prefix: &str) -> Option<(u64, u64)> {
    if !(4..=16).contains(&prefix.len()) || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let value = u64::from_str_radix(prefix, 16).ok()?;
    let free = 4 * (16 - prefix.len() as u32);
    let lo = value.checked_shl(free).unwrap_or(0);
    let hi = lo | ((1u64 << free) - 1);
    Some((lo, hi))
}

/// Room on `dir`'s file system for `need` more bytes, and a margin (1 %
/// of the need, at least 1 MiB), or an error that says how much is free.
pub(super) fn check_space(dir: &std::path::Path, need: u64) -> Result<(), ControlError> {
    let Some(free) = files::free_space(dir) else {
        return Ok(()); // unknown: the write itself will say
    };
    let want = need.saturating_add((need / 100).max(1 << 20));
    if free < want {
        return Err(err(
            ErrorCode::FileError,
            format!(
                "not enough space in {}: {} needed, {} free",
                dir.display(),
                human_bytes(want),
                human_bytes(free)
            ),
        ));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[u]),
    }
}

/// The piece size to offer a file of `len` bytes in, or an error past
/// the largest file a transfer can carry.
fn piece_size(path: &std::path::Path, len: u64) -> Result<u32, ControlError> {
    proto::piece_size_for(len).ok_or_else(|| {
        err(
            ErrorCode::InvalidArgument,
            format!(
                "{} is larger than a transfer can carry (4 TiB)",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_prefix_is_one_interval() {
        assert_eq!(prefix_range("abc"), None, "four digits at least");
        assert_eq!(prefix_range("abcg"), None);
        assert_eq!(
            prefix_range("abcd"),
            Some((0xabcd_0000_0000_0000, 0xabcd_ffff_ffff_ffff))
        );
        assert_eq!(
            prefix_range("0123456789abcdef"),
            Some((0x0123_4567_89ab_cdef, 0x0123_4567_89ab_cdef))
        );
        // The interval keeps its order as the signed ids SQLite stores.
        let (lo, hi) = prefix_range("8000").unwrap();
        assert!((lo as i64) <= (hi as i64));
        let (lo, hi) = prefix_range("7fff").unwrap();
        assert!((lo as i64) <= (hi as i64));
    }

    #[test]
    fn the_rate_is_taken_over_the_last_three_seconds() {
        let t0 = Instant::now();
        let mut s = VecDeque::new();
        note(&mut s, t0, 0);
        assert_eq!(rate(&s), None, "one sample says nothing");
        note(&mut s, t0 + Duration::from_millis(100), 1_000);
        assert_eq!(rate(&s), None, "too short a span");
        note(&mut s, t0 + Duration::from_secs(1), 10_000_000);
        assert_eq!(rate(&s), Some(10_000_000.0));
        // A stall, then a burst: only the last three seconds count.
        note(&mut s, t0 + Duration::from_secs(10), 10_000_000);
        note(&mut s, t0 + Duration::from_secs(12), 30_000_000);
        assert_eq!(s.len(), 2);
        assert_eq!(rate(&s), Some(10_000_000.0));
    }
}
