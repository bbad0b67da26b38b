//! What happens to transfers: restored at start, the node's transfer
//! events and the disk side's finished jobs written to the database and
//! shown to watchers.

use super::*;

/// Incoming offers waiting for an answer, from everyone, at most; past it
/// an offer is refused with a reason the sender sees.
pub(super) const MAX_OFFERS_WAITING: u64 = 50_000;
use proto::{FileDesc, Group, GroupId, TransferId};

/// Progress events per transfer at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl Daemon {
    /// Takes up stored transfers after a start: incoming ones under way
    /// resume from their verified pieces, outgoing ones are offered again
    /// (if their file did not change).
    pub(super) fn restore_transfers(&mut self, now: Instant) -> anyhow::Result<()> {
        for t in self.store.transfers()? {
            if t.group != 0 {
                self.groups.insert(t.id, t.group);
            }
            match (t.outgoing, t.state) {
                (true, TransferState::Offered | TransferState::Active | TransferState::Paused) => {
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
                        self.end_at_restart_logged(now, &t, why, told);
                        continue;
                    }
                    tracing::info!(id = %hex_id(t.id), peer = %t.peer, "TRANSFER(RESUME_SENDING)");
                    self.node.offer_file(now, &t.peer, t.desc(), hashes);
                }
                (false, TransferState::Offered) => {
                    self.node.restore_offer(now, &t.peer, t.desc());
                }
                (false, TransferState::Active | TransferState::Paused) => {
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
                        self.end_at_restart_logged(now, &t, "the partial file is gone", told);
                        continue;
                    }
                    let have: Vec<bool> = t.verified.iter().map(|v| *v == 1).collect();
                    tracing::info!(id = %hex_id(t.id), peer = %t.peer, held = have.iter().filter(|h| **h).count(), "TRANSFER(RESUME_RECEIVING)");
                    self.node.restore_incoming(now, &t.peer, t.desc(), &have);
                    if t.state == TransferState::Paused {
                        // Still paused: the check for room resumes it.
                        self.node
                            .pause_file(now, &t.peer, t.tid(), "the receiver's disk is full");
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// As [`Self::end_at_restart`]; a store that cannot write (a full
    /// disk) is logged, not a reason to stop the start.
    fn end_at_restart_logged(&mut self, now: Instant, t: &TransferRow, why: &str, told: &str) {
        if let Err(e) = self.end_at_restart(now, t, why, told) {
            tracing::warn!(id = %hex_id(t.id), error = %e, "STORE(TRANSFER_STATE)");
        }
    }

    /// A transfer that cannot go on after a restart: ended here (`why`,
    /// for `transfers`) and on the peer's side (`told`, without our paths).
    pub(super) fn end_at_restart(
        &mut self,
        now: Instant,
        t: &TransferRow,
        why: &str,
        told: &str,
    ) -> anyhow::Result<()> {
        self.store
            .transfer_state(t.id, TransferState::Ended, None, Some(why))?;
        self.node.tell_ended(now, &t.peer, t.tid(), told);
        Ok(())
    }

    pub(super) fn end_transfer(&mut self, row: &TransferRow, reason: &str) {
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
    pub(super) fn write_failed(&mut self, now: Instant, peer: &str, id: u64, e: std::io::Error) {
        let Ok(row) = self.transfer_row(id) else {
            return;
        };
        if row.state != TransferState::Active {
            return; // ended already: packets still in flight
        }
        let full = e.raw_os_error() == Some(libc::ENOSPC);
        if full {
            // Paused, not ended: what arrived and was verified stays, the
            // sender stops, and both go on when space returns
            // (`resume_paused`), across restarts too.
            let reason = "the disk is full; it goes on by itself when there is room";
            tracing::warn!(id = %hex_id(id), "TRANSFER(PAUSED_DISK_FULL)");
            self.node
                .pause_file(now, peer, TransferId(id), "the receiver's disk is full");
            let _ = self
                .store
                .transfer_state(id, TransferState::Paused, None, Some(reason));
            self.broadcast(Event::TransferPaused {
                id: hex_id(id),
                peer: peer.to_owned(),
                reason: reason.to_owned(),
                group: self.group_of(id),
            });
            return;
        }
        // The peer is told why, not where our files are.
        let (told, reason) = {
            let r = format!("cannot write the file: {e}");
            ("the receiver cannot write the file".to_owned(), r)
        };
        tracing::warn!(id = %hex_id(id), %reason, "TRANSFER(WRITE_FAILED)");
        self.node.cancel_file(now, peer, TransferId(id), &told);
        self.end_transfer(&row, &reason);
    }

    pub(super) fn on_job(&mut self, now: Instant, done: JobDone) {
        match done {
            JobDone::Hashed {
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
                    piece_size,
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
                self.node.offer_file(now, &peer, row.desc(), piece_hashes);
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
                    let group = Group {
                        id: GroupId(group.0),
                        files: group.1,
                    };
                    self.node
                        .skip_file(now, &peer, TransferId(id), name, group, reason);
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
                self.node
                    .piece_checked(now, &peer, TransferId(id), piece, ok);
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
                self.node
                    .file_checked(now, &peer, TransferId(id), result.map(|_| ()));
            }
        }
    }

    /// Why a new incoming offer is refused, if it is: too many offers wait
    /// already (from everyone), or it would make its directory more than
    /// that directory said it is, or it comes for a directory already
    /// accepted (which was taken as listed then).
    fn offer_refusal(&mut self, now: Instant, group: u64, group_files: u32) -> Option<String> {
        let waiting = match self.offers_waiting {
            Some((at, n)) if now.saturating_duration_since(at) < Duration::from_secs(1) => n,
            _ => {
                let n = self.store.offers_waiting().unwrap_or(0);
                self.offers_waiting = Some((now, n));
                n
            }
        };
        if waiting >= MAX_OFFERS_WAITING {
            return Some(format!(
                "the receiver has {MAX_OFFERS_WAITING} offers waiting for an answer; offer again later"
            ));
        }
        if group == 0 {
            return None;
        }
        if group_files as usize > proto::MAX_PENDING_OFFERS {
            return Some(format!(
                "a directory of more than {} files",
                proto::MAX_PENDING_OFFERS
            ));
        }
        let accepted = self
            .store
            .setting(&format!("group_root:{}", hex_id(group)))
            .ok()
            .flatten()
            .is_some();
        if accepted {
            return Some("not part of the directory as it was accepted".into());
        }
        match self.store.group_count(group) {
            Ok((n, files)) if n > 0 && files != group_files => Some(format!(
                "the directory said {files} files, this file says {group_files}"
            )),
            Ok((n, _)) if n >= u64::from(group_files) => {
                Some(format!("more files than the directory's {group_files}"))
            }
            Ok(_) => None,
            Err(e) => Some(format!("storage error: {e}")),
        }
    }

    /// Forgets records of transfers finished or ended longer ago than
    /// `--keep-transfers` (a partial file kept for resuming keeps its
    /// record).
    pub(super) fn prune_transfers(&mut self) {
        let Some(keep) = self.config.keep_transfers else {
            return;
        };
        let before = now_ms().saturating_sub(keep.as_millis() as u64);
        match self.store.prune_transfers(before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "TRANSFER(PRUNED)"),
            Err(e) => tracing::warn!(error = %e, "STORE(PRUNE)"),
        }
    }

    pub(super) fn on_transfer(&mut self, now: Instant, peer: String, event: proto::TransferEvent) {
        use proto::TransferEvent as T;
        match event {
            T::Offered(FileDesc {
                id: TransferId(id),
                path,
                size,
                piece_size,
                hash,
                group: g,
            }) => {
                let (group, group_files) = g.map_or((0, 0), |g| (g.id.0, g.files));
                if group != 0 {
                    self.groups.insert(id, group);
                }
                // A repeat of an offer we know keeps its record; one we
                // finished or ended is answered as such, not shown again.
                let known = self.store.transfer(id).ok().flatten();
                match known.as_ref().map(|t| t.state) {
                    Some(TransferState::Done) => {
                        return self.node.already_have(now, &peer, TransferId(id))
                    }
                    Some(TransferState::Ended) => {
                        self.node
                            .cancel_file(now, &peer, TransferId(id), "this transfer ended");
                        return;
                    }
                    _ => {}
                }
                if known.is_none() {
                    if let Some(reason) = self.offer_refusal(now, group, group_files) {
                        tracing::info!(id = %hex_id(id), %peer, reason, "TRANSFER(OFFER_REFUSED)");
                        self.node.cancel_file(now, &peer, TransferId(id), &reason);
                        return;
                    }
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
                    if let Some((_, n)) = self.offers_waiting.as_mut() {
                        *n += 1;
                    }
                    // From a peer whose files we take without asking.
                    let auto = self
                        .store
                        .setting(&format!("auto_accept:{peer}"))
                        .ok()
                        .flatten()
                        .filter(|d| !d.is_empty());
                    // (A directory once all its files are offered: it is
                    // taken as listed, and nothing is added to it later.)
                    let complete = group == 0
                        || self
                            .store
                            .group_count(group)
                            .is_ok_and(|(n, files)| n >= u64::from(files));
                    // A directory the user accepted while it was arriving.
                    let asked = self
                        .store
                        .setting(&format!("group_accept:{}", hex_id(group)))
                        .ok()
                        .flatten()
                        .filter(|d| group != 0 && !d.is_empty());
                    let auto = asked.or(auto);
                    if let Some(dir) = auto.filter(|_| complete) {
                        let dir = std::path::PathBuf::from(dir);
                        let _ = std::fs::create_dir_all(&dir);
                        let done = if group != 0 {
                            self.accept_group(now, group, &dir).map(|_| ())
                        } else {
                            transfers::check_space(&dir, size).and_then(|_| {
                                self.accept_into(now, &row, &dir, &files::sanitize(&path))
                            })
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
                id: TransferId(id),
                path,
                group:
                    Group {
                        id: GroupId(group),
                        files: group_files,
                    },
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
            T::Accepted { id: TransferId(id) } => {
                let _ = self
                    .store
                    .transfer_state(id, TransferState::Active, None, None);
                tracing::info!(id = %hex_id(id), %peer, "TRANSFER(PEER_ACCEPTED)");
            }
            T::Progress {
                id: TransferId(id),
                done,
            } => {
                self.note_progress(now, id, done);
                let due = self
                    .progress_shown
                    .get(&id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= PROGRESS_EVERY);
                if due {
                    self.progress_shown.insert(id, now);
                    let size = self
                        .node
                        .transfer_of(&peer, TransferId(id))
                        .map_or(0, |s| s.size);
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
            T::Finished { id: TransferId(id) } => {
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
            T::Ended {
                id: TransferId(id),
                reason,
            } => {
                if let Ok(row) = self.transfer_row(id) {
                    if !row.state.is_final() {
                        tracing::info!(id = %hex_id(id), %peer, %reason, "TRANSFER(ENDED)");
                        self.end_transfer(&row, &reason);
                    }
                }
            }
            T::ReadFailed {
                id: TransferId(id),
                error,
            } => {
                tracing::warn!(id = %hex_id(id), %peer, %error, "TRANSFER(READ_FAILED)");
            }
            T::Paused {
                id: TransferId(id),
                reason,
            } => {
                tracing::info!(id = %hex_id(id), %peer, %reason, "TRANSFER(PAUSED_BY_PEER)");
                let _ = self
                    .store
                    .transfer_state(id, TransferState::Paused, None, Some(&reason));
                self.broadcast(Event::TransferPaused {
                    id: hex_id(id),
                    peer,
                    reason,
                    group: self.group_of(id),
                });
            }
            T::Resumed { id: TransferId(id) } => {
                tracing::info!(id = %hex_id(id), %peer, "TRANSFER(RESUMED_BY_PEER)");
                let _ = self
                    .store
                    .transfer_state(id, TransferState::Active, None, None);
                self.broadcast(Event::TransferResumed {
                    id: hex_id(id),
                    peer,
                    group: self.group_of(id),
                });
            }
        }
    }

    /// Paused incoming transfers whose disk has room again go on (every
    /// [`RESUME_CHECK`]): room for what is still to come, and a margin.
    pub(super) fn resume_paused(&mut self, now: Instant) {
        let Ok(paused) = self.store.paused_incoming() else {
            return;
        };
        for row in paused {
            let Some(part) = row.part.as_deref() else {
                continue;
            };
            let dir = std::path::Path::new(part)
                .parent()
                .unwrap_or(std::path::Path::new("."));
            let held = row.verified.iter().filter(|v| **v == 1).count() as u64;
            let left = row.size.saturating_sub(held * row.piece_size as u64);
            if transfers::check_space(dir, left).is_err() {
                continue;
            }
            self.node.io_mut().writable_again(row.id);
            if self.node.resume_file(now, &row.peer, row.tid()) {
                tracing::info!(id = %hex_id(row.id), peer = %row.peer, "TRANSFER(RESUMED)");
                let _ = self
                    .store
                    .transfer_state(row.id, TransferState::Active, None, None);
                self.broadcast(Event::TransferResumed {
                    id: hex_id(row.id),
                    peer: row.peer.clone(),
                    group: self.group_of(row.id),
                });
            }
        }
    }
}
