//! The control API's side of the daemon: a request line becomes a
//! command on the node or the database; one that needs the network waits
//! (a [`Waiter`]) until a node event or its deadline answers it.

use super::*;

/// Transfers a `transfers` request without a limit gets.
const DEFAULT_TRANSFERS_PAGE: u32 = 100;

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

pub(super) enum Wait {
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

pub(super) enum RidKind {
    Register,
    Decline,
}

/// Writes `sends` in `batch`, runs of one peer's together, in order;
/// returns their `seq`s.
pub(super) fn store_sends(
    batch: &crate::store::Batch<'_>,
    sends: &[PendingSend],
) -> Result<Vec<u64>, crate::store::StoreError> {
    let mut seqs = Vec::with_capacity(sends.len());
    for run in sends.chunk_by(|a, b| a.peer == b.peer) {
        let msgs: Vec<(u64, &str)> = run.iter().map(|s| (s.sent_ms, s.text.as_str())).collect();
        let first = batch.enqueue_many(&run[0].peer, &msgs)?;
        seqs.extend((0..run.len() as u64).map(|i| first + i));
    }
    Ok(seqs)
}

/// A `send` taken and not yet stored ([`Daemon::flush_sends`]).
pub(super) struct PendingSend {
    id: u64,
    out: Reply,
    peer: String,
    text: String,
    sent_ms: u64,
}

pub(super) struct Waiter {
    id: u64,
    out: Reply,
    wait: Wait,
    pub(super) deadline: Instant,
}

impl Daemon {
    pub(super) fn wait(&mut self, now: Instant, id: u64, out: Reply, wait: Wait, for_: Duration) {
        self.waiters.push(Waiter {
            id,
            out,
            wait,
            deadline: now + for_,
        });
    }

    /// Answers (and removes) every waiter `f` picks.
    pub(super) fn settle(
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

    pub(super) fn expire_waiters(&mut self, now: Instant) {
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

    /// Stores the sends taken since the last call in one transaction
    /// (one fsync: group commit), then hands them to the node and answers
    /// each. If they cannot be stored, each is answered with the error
    /// and none is sent.
    pub(super) fn flush_sends(&mut self, now: Instant) {
        if self.sends.is_empty() {
            return;
        }
        let sends = std::mem::take(&mut self.sends);
        let stored = (|| {
            let batch = self.store.batch()?;
            let seqs = store_sends(&batch, &sends)?;
            batch.commit()?;
            Ok(seqs)
        })();
        self.finish_sends(now, sends, stored);
    }

    /// Answers sends once their transaction ended: stored, they go to the
    /// node; not stored, each gets the error and none goes.
    pub(super) fn finish_sends(
        &mut self,
        now: Instant,
        sends: Vec<PendingSend>,
        stored: Result<Vec<u64>, crate::store::StoreError>,
    ) {
        let seqs = match stored {
            Ok(seqs) => seqs,
            Err(e) => {
                tracing::error!(error = %e, messages = sends.len(), "STORE(SEND_NOT_STORED)");
                for s in sends {
                    let e = err(ErrorCode::Internal, format!("message not stored: {e}"));
                    respond(&s.out, Response::err(s.id, e));
                }
                return;
            }
        };
        for (s, seq) in sends.into_iter().zip(seqs) {
            // Asked before the message joins the flow: its own packet
            // must not count as unanswered yet.
            let reachable = self.node.is_reachable(&s.peer);
            let reason = (!reachable).then(|| self.why_unreachable(now, &s.peer));
            self.node.send_message(
                now,
                &s.peer,
                ChatMessage {
                    seq,
                    sent_ms: s.sent_ms,
                    body: s.text.into_bytes(),
                },
            );
            let sent = Sent {
                peer: s.peer,
                seq,
                queued: !reachable,
                reason,
            };
            if let Ok(line) = Response::ok_line(s.id, &sent) {
                // (A client that stopped reading loses its answers.)
                let _ = s.out.send(Out::Response(line));
            }
        }
    }

    pub(super) fn on_input(&mut self, now: Instant, input: Input) {
        match input {
            Input::Closed { conn } => {
                self.watchers.remove(&conn);
            }
            Input::Request { conn, request, out } => {
                let Request { id, command } = request;
                if !matches!(command, Command::Send { .. }) {
                    // Whatever comes after a send sees it stored.
                    self.flush_sends(now);
                }
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

    pub(super) fn check_name(name: &str) -> Result<(), ControlError> {
        validate_name(name).map_err(|e| err(ErrorCode::InvalidArgument, format!("{name:?}: {e}")))
    }

    pub(super) fn require_login(&self) -> Result<(), ControlError> {
        match self.node.link_state() {
            LinkState::LoggedIn => Ok(()),
            LinkState::KeyMismatch => Err(err(
                ErrorCode::ServerKeyMismatch,
                "the rendezvous server's key changed; see the daemon's log",
            )),
            _ if self.node.server_version_mismatch().is_some() => Err(err(
                ErrorCode::NotLoggedIn,
                version_words(self.node.server_version_mismatch().unwrap_or(0)),
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
    pub(super) fn command(
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
            Command::Transfers {
                group: Some(group), ..
            } => {
                // (A directory still being hashed has no files yet: none.)
                let rows = match self.find_group(&group, false)? {
                    Some(g) => self.store.group_members(g).map_err(internal)?,
                    None => Vec::new(),
                };
                json(&self.infos(&rows))
            }
            Command::Transfers { limit, offset, .. } => {
                let list = self
                    .transfer_list(limit.unwrap_or(DEFAULT_TRANSFERS_PAGE), offset.unwrap_or(0))?;
                json(&list)
            }
            Command::Cancel { transfer } => {
                // A directory: cancel each of its files not finished.
                let members = match self.find_group(&transfer, false)? {
                    Some(g) => self.store.group_members(g).map_err(internal)?,
                    None => Vec::new(),
                };
                if !members.is_empty() {
                    // (Nor is it taken later, once complete.)
                    let key = format!("group_accept:{}", hex_id(members[0].group));
                    let _ = self.store.set_setting(&key, "");
                    for row in members.iter().filter(|t| !t.state.is_final()) {
                        self.node
                            .cancel_file(now, &row.peer, row.tid(), "cancelled by the user");
                        self.end_transfer(row, "cancelled by the user");
                    }
                    let group = members[0].group;
                    let rows = self.store.group_members(group).map_err(internal)?;
                    return json(&Cancelled::Directory(self.infos(&rows)));
                }
                let row = self.find_transfer(&transfer)?;
                if row.state.is_final() {
                    return Err(err(
                        ErrorCode::NoTransfer,
                        format!("transfer {} is already {}", hex_id(row.id), row.state),
                    ));
                }
                let reason = "cancelled by the user";
                self.node.cancel_file(now, &row.peer, row.tid(), reason);
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
                    server_state: match (link.state(), self.node.server_version_mismatch()) {
                        (LinkState::LoggedIn, _) | (_, None) => link.state().as_str().into(),
                        (_, Some(_)) => "version_mismatch".into(),
                    },
                    server_fingerprint: link.server_key().map(|k| fingerprint(&k)),
                    observed: link.observed().map(|a| a.to_string()),
                    data_dir: self.config.data_dir.display().to_string(),
                })
            }
            Command::Register { name, invite } => {
                Self::check_name(&name)?;
                let invite = invite.unwrap_or_default();
                if invite.len() > proto::wire::MAX_INVITE {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!(
                            "an invite token is at most {} bytes",
                            proto::wire::MAX_INVITE
                        ),
                    ));
                }
                if self.node.link_state() == LinkState::KeyMismatch {
                    self.require_login()?;
                }
                let rid = self.node.register_invited(now, &name, &invite);
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
                if !self.node.is_up(&peer) && !self.node.is_known(&peer) {
                    return Err(err(
                        ErrorCode::NotConnected,
                        format!("not connected to {peer}: run `p2pctl connect {peer}` first"),
                    ));
                }
                // Stored with the other sends of this burst, in one
                // transaction, before any of them is answered.
                self.sends.push(PendingSend {
                    id,
                    out: out.clone(),
                    peer,
                    text,
                    sent_ms: now_ms(),
                });
                Ok(None)
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
                        down_s: p
                            .down
                            .as_ref()
                            .map(|(t, _)| now.saturating_duration_since(*t).as_secs_f64()),
                        reason: p.down.map(|(_, r)| r),
                        unanswered_s: p.unanswered.map(|d| d.as_secs_f64()),
                        reconnecting: p.reconnecting,
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
                json(&PeersResult {
                    peers,
                    requests,
                    server: self.node.link_state().as_str().into(),
                    server_away_s: self.node.server_away_for(now).map(|d| d.as_secs_f64()),
                })
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

    /// Why a message to `peer` waits, in words: its session is down (and
    /// why), or its path has not answered for a while.
    fn why_unreachable(&self, now: Instant, peer: &str) -> String {
        let status = self.node.peer_status().into_iter().find(|p| p.name == peer);
        match status {
            Some(p) if p.unanswered.is_some() => format!(
                "{peer} has not answered for {} s; trying the relay too, reconnecting if it stays silent",
                p.unanswered.unwrap_or_default().as_secs()
            ),
            Some(p) => match p.down {
                Some((since, reason)) => format!(
                    "{peer} is not connected ({reason}, {} s ago); reconnecting",
                    now.saturating_duration_since(since).as_secs()
                ),
                None => format!("{peer} is not connected yet; connecting"),
            },
            None => format!("{peer} is not connected; connecting"),
        }
    }

    pub(super) fn connected(&self, peer: &str) -> Option<Connected> {
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

    pub(super) fn on_response(&mut self, rid: u32, result: Result<ServerToClient, RequestError>) {
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

pub(super) fn fail_error(reason: FailReason, detail: &str, what: &str) -> ControlError {
    let code = match reason {
        FailReason::NameTaken | FailReason::KeyAlreadyRegistered => ErrorCode::NameTaken,
        FailReason::NameInvalid | FailReason::SelfConnect => ErrorCode::InvalidArgument,
        FailReason::NotRegistered | FailReason::NotLoggedIn => ErrorCode::NotLoggedIn,
        FailReason::UnknownUser => ErrorCode::UnknownUser,
        FailReason::Offline => ErrorCode::Offline,
        FailReason::Declined | FailReason::RateLimited | FailReason::InviteRequired => {
            ErrorCode::Refused
        }
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
pub(super) fn describe(reason: FailReason) -> String {
    match reason {
        FailReason::NameTaken => "the name belongs to another key".into(),
        FailReason::UnknownUser => "no such user".into(),
        FailReason::Offline => "not online".into(),
        FailReason::Declined => "declined".into(),
        FailReason::TimedOut => "no answer in time".into(),
        FailReason::NotLoggedIn => "not logged in".into(),
        FailReason::SelfConnect => "that is you".into(),
        FailReason::NoSuchIntro => "no such request (it expired or was withdrawn)".into(),
        FailReason::RateLimited => "too many from your address lately; try again later".into(),
        other => other.as_str().replace('_', " "),
    }
}

pub(super) fn request_error(e: &RequestError, what: &str) -> ControlError {
    match e {
        RequestError::Failed { reason, detail } => fail_error(*reason, detail, what),
        RequestError::TimedOut => err(
            ErrorCode::TimedOut,
            format!("{what}: the rendezvous server did not answer"),
        ),
    }
}

pub(super) fn respond(out: &Reply, resp: Response) {
    if let Ok(line) = serde_json::to_string(&resp) {
        // A client that stopped reading loses its answers, not the daemon.
        let _ = out.send(Out::Response(line));
    }
}

pub(super) fn node_error(e: NodeError) -> ControlError {
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

/// What to say when the server speaks protocol version `theirs`.
pub(super) fn version_words(theirs: u8) -> String {
    let ours = proto::wire::VERSION;
    let older = if theirs < ours {
        "the server"
    } else {
        "this p2pd"
    };
    format!(
        "the rendezvous server speaks protocol version {theirs}, this p2pd version {ours}: \
         {older} is older and must be upgraded"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_refusals_map_to_stable_codes_and_plain_words() {
        let e = fail_error(FailReason::NameTaken, "", "registration refused");
        assert_eq!(e.code, ErrorCode::NameTaken);
        assert_eq!(
            e.message,
            "registration refused: the name belongs to another key"
        );
        // The server's own detail wins over our words.
        let e = fail_error(FailReason::Offline, "bob left", "cannot connect");
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::Offline, "cannot connect: bob left")
        );
        assert_eq!(
            fail_error(FailReason::Declined, "", "x").code,
            ErrorCode::Refused
        );
        assert_eq!(
            fail_error(FailReason::Other(99), "", "x").code,
            ErrorCode::Internal
        );
        let e = request_error(&RequestError::TimedOut, "cannot list users");
        assert_eq!(e.code, ErrorCode::TimedOut);
        assert!(e.message.contains("did not answer"));
    }

    #[test]
    fn a_version_mismatch_names_both_versions_and_the_older_side() {
        let ours = proto::wire::VERSION;
        let w = version_words(ours - 1);
        assert!(
            w.contains(&format!("version {}", ours - 1)) && w.contains(&format!("version {ours}"))
        );
        assert!(w.contains("the server is older"));
        assert!(version_words(ours + 1).contains("this p2pd is older"));
    }

    #[test]
    fn node_errors_say_what_to_do() {
        let e = node_error(NodeError::NotConnected("bob".into()));
        assert_eq!(e.code, ErrorCode::NotConnected);
        assert!(e.message.contains("p2pctl connect bob"));
        assert_eq!(
            node_error(NodeError::NoRequest("bob".into())).code,
            ErrorCode::NoRequest
        );
    }
}
