//! Node events: stored first (in one transaction, before any datagram
//! that acknowledges them leaves), then answered and broadcast to
//! watchers.

use super::*;

impl Daemon {
    /// Stores the sends taken in this burst and what the events change,
    /// in one transaction (one fsync), then answers the sends.
    ///
    /// If the received messages or acknowledgements cannot be stored the
    /// daemon stops with the error: an acknowledgement must never leave
    /// for a message that is not on disk (the sender keeps it and delivers
    /// it once the daemon runs again). If only the sends cannot be, they
    /// fail and the daemon goes on.
    pub(super) fn persist(
        &mut self,
        now: Instant,
        sends: Vec<PendingSend>,
        events: &[NodeEvent],
    ) -> anyhow::Result<()> {
        let writes = events
            .iter()
            .any(|e| matches!(e, NodeEvent::Delivered { .. } | NodeEvent::Acked { .. }));
        if sends.is_empty() && !writes {
            return Ok(());
        }
        let both = (|| {
            let batch = self.store.batch()?;
            let seqs = control::store_sends(&batch, &sends)?;
            write_events(&batch, events)?;
            batch.commit()?;
            Ok(seqs)
        })();
        let (stored, events_stored) = match both {
            Ok(seqs) => (Ok(seqs), Ok(())),
            // Was it the sends? The events alone, then.
            Err(e) if writes && !sends.is_empty() => {
                let alone = (|| {
                    let batch = self.store.batch()?;
                    write_events(&batch, events)?;
                    batch.commit()
                })();
                (Err(e), alone)
            }
            Err(e) if writes => (Ok(Vec::new()), Err(e)),
            Err(e) => (Err(e), Ok(())),
        };
        if !sends.is_empty() {
            self.finish_sends(now, sends, stored);
        }
        if let Err(e) = events_stored {
            tracing::error!(error = %e, "STORE(WRITE_FAILED)");
            self.broadcast(Event::Error {
                message: format!("p2pd is stopping: it could not store messages: {e}"),
            });
            anyhow::bail!(
                "stopping: could not store received messages ({e}); nothing was acknowledged, \
                 the senders keep them until p2pd runs again"
            );
        }
        Ok(())
    }

    pub(super) fn on_event(&mut self, now: Instant, event: NodeEvent) {
        match event {
            NodeEvent::ServerConnected {
                server_key,
                learned,
            } => {
                if learned {
                    tracing::warn!(
                        fingerprint = %fingerprint(&server_key),
                        "SERVER_KEY(PINNED_ON_FIRST_USE)"
                    );
                    eprintln!(
                        "p2pd: pinned the rendezvous server's key on first use: {} (fingerprint {})",
                        to_hex(&server_key),
                        fingerprint(&server_key)
                    );
                }
                if let Err(e) = self.store.set_setting("server_key", &to_hex(&server_key)) {
                    tracing::error!(error = %e, "STORE(WRITE_FAILED)");
                }
                self.broadcast(Event::Server {
                    state: "connected".into(),
                    detail: format!("server key {}", fingerprint(&server_key)),
                });
            }
            NodeEvent::ServerKeyMismatch { pinned, offered } => {
                let detail = format!(
                    "REFUSING the rendezvous server: its key is {} but {} was pinned. \
                     If the server really changed its key, restart p2pd with --server-key {}",
                    fingerprint(&offered),
                    fingerprint(&pinned),
                    to_hex(&offered)
                );
                tracing::error!("SERVER_KEY(MISMATCH) {detail}");
                eprintln!("p2pd: {detail}");
                self.broadcast(Event::Server {
                    state: "key_mismatch".into(),
                    detail: detail.clone(),
                });
                self.settle(|w| {
                    matches!(w, Wait::Login | Wait::Rid(..) | Wait::Users(_))
                        .then(|| Err(err(ErrorCode::ServerKeyMismatch, detail.clone())))
                });
            }
            NodeEvent::ServerDown { reason } => {
                tracing::warn!(%reason, "SERVER(DOWN)");
                self.broadcast(Event::Server {
                    state: "down".into(),
                    detail: reason,
                });
            }
            NodeEvent::LoggedIn { name, observed } => {
                tracing::info!(%name, %observed, "SERVER(LOGGED_IN)");
                if let Err(e) = self.store.set_setting("name", &name) {
                    tracing::error!(error = %e, "STORE(WRITE_FAILED)");
                }
                self.broadcast(Event::Server {
                    state: "logged_in".into(),
                    detail: format!("as {name}, seen from {observed}"),
                });
                let v = serde_json::to_value(LoggedIn {
                    name: name.clone(),
                    observed: observed.to_string(),
                })
                .unwrap_or_default();
                self.settle(|w| matches!(w, Wait::Login).then(|| Ok(v.clone())));
            }
            NodeEvent::LoginFailed { reason, detail } => {
                let e = fail_error(reason, &detail, "login failed");
                tracing::warn!(%e, "SERVER(LOGIN_FAILED)");
                self.broadcast(Event::Server {
                    state: "login_failed".into(),
                    detail: e.message.clone(),
                });
                self.settle(|w| matches!(w, Wait::Login).then(|| Err(e.clone())));
            }
            NodeEvent::Response { rid, result } => self.on_response(rid, result),
            NodeEvent::Users { id, result } => {
                let answer = match result {
                    Ok(users) => Ok(serde_json::to_value(
                        users
                            .into_iter()
                            .map(|u| UserInfo {
                                fingerprint: fingerprint(&u.sign_key),
                                name: u.name,
                            })
                            .collect::<Vec<_>>(),
                    )
                    .unwrap_or_default()),
                    Err(e) => Err(request_error(&e, "cannot list users")),
                };
                self.settle(|w| matches!(w, Wait::Users(r) if *r == id).then(|| answer.clone()));
            }
            NodeEvent::ConnectRequest {
                name,
                identity,
                auto_accepted,
            } => {
                tracing::info!(peer = %name, auto_accepted, "INTRO(REQUESTED)");
                self.broadcast(Event::ConnectRequest {
                    peer: name,
                    fingerprint: identity.fingerprint(),
                    auto_accepted,
                });
            }
            NodeEvent::ConnectFailed { name, reason } => {
                let e = fail_error(reason, "", &format!("cannot connect to {name}"));
                tracing::info!(peer = %name, reason = reason.as_str(), "INTRO(FAILED)");
                self.broadcast(Event::ConnectFailed {
                    peer: name.clone(),
                    reason: reason.as_str().into(),
                });
                self.settle(|w| matches!(w, Wait::Up(p, _) if *p == name).then(|| Err(e.clone())));
            }
            NodeEvent::KeyMismatch {
                name,
                pinned,
                offered,
            } => {
                let msg = format!(
                    "REFUSED {name}: it presented key {} but {} is pinned for that name",
                    offered.fingerprint(),
                    pinned.fingerprint()
                );
                tracing::error!("PEER(KEY_MISMATCH) {msg}");
                self.broadcast(Event::KeyMismatch {
                    peer: name.clone(),
                    pinned: pinned.fingerprint(),
                    offered: offered.fingerprint(),
                });
                self.settle(|w| {
                    matches!(w, Wait::Up(p, _) if *p == name)
                        .then(|| Err(err(ErrorCode::Refused, msg.clone())))
                });
            }
            NodeEvent::PeerUp {
                name,
                endpoint,
                identity,
            } => {
                tracing::info!(peer = %name, %endpoint, "PEER(UP)");
                self.pin(&name, &identity);
                self.note_session(&name, true);
                let path = self.node.path_name(endpoint).to_owned();
                let c = Connected {
                    peer: name.clone(),
                    endpoint: endpoint.to_string(),
                    path: path.clone(),
                    fingerprint: identity.fingerprint(),
                };
                self.broadcast(Event::PeerUp {
                    peer: name.clone(),
                    endpoint: endpoint.to_string(),
                    path,
                    fingerprint: identity.fingerprint(),
                });
                let v = serde_json::to_value(&c).unwrap_or_default();
                self.settle(|w| matches!(w, Wait::Up(p, _) if *p == name).then(|| Ok(v.clone())));
            }
            NodeEvent::PeerDown { name, reason } => {
                tracing::info!(peer = %name, %reason, "PEER(DOWN)");
                self.note_session(&name, false);
                self.broadcast(Event::PeerDown {
                    peer: name.clone(),
                    reason: reason.clone(),
                });
                let e = err(ErrorCode::NotConnected, format!("{name}: {reason}"));
                self.settle(|w| {
                    matches!(w, Wait::Up(p, _) | Wait::Pong(p, _) if *p == name)
                        .then(|| Err(e.clone()))
                });
            }
            NodeEvent::Transport(command) => self.on_transport(command),
            NodeEvent::VersionMismatch {
                from,
                server: true,
                theirs,
            } => {
                let detail = control::version_words(theirs);
                eprintln!("p2pd: {detail}");
                self.broadcast(Event::Server {
                    state: "version_mismatch".into(),
                    detail: format!("{detail} ({from})"),
                });
            }
            NodeEvent::VersionMismatch { from, theirs, .. } => {
                self.broadcast(Event::Error {
                    message: format!(
                        "a peer at {from} speaks protocol version {theirs}, this p2pd version {}: \
                         the older one must be upgraded",
                        proto::wire::VERSION
                    ),
                });
            }
            NodeEvent::LastPath {
                name,
                direct,
                relayed,
            } => {
                // Lost, it costs only the serverless path to this peer, or
                // a second before the relay.
                if let Err(e) = self.store.set_last_path(&name, direct, relayed) {
                    tracing::warn!(peer = %name, error = %e, "STORE(LAST_PATH_NOT_SAVED)");
                }
            }
            NodeEvent::PathChanged { name, endpoint } => {
                let path = self.node.path_name(endpoint).to_owned();
                tracing::info!(peer = %name, %endpoint, %path, "PEER(PATH_CHANGED)");
                self.broadcast(Event::PathChanged {
                    peer: name,
                    endpoint: endpoint.to_string(),
                    path,
                });
            }
            NodeEvent::Delivered {
                peer,
                seq,
                sent_ms,
                body,
            } => self.broadcast(Event::Message {
                peer,
                seq,
                sent_ms,
                text: proto::control::utf8(&body).into_owned(),
            }),
            NodeEvent::Acked { peer, seq } => self.broadcast(Event::Delivered { peer, seq }),
            NodeEvent::Transfer { peer, event } => self.on_transfer(now, peer, event),
            NodeEvent::Pong { peer, nonce, rtt } => {
                let v = serde_json::to_value(PingResult {
                    peer: peer.clone(),
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                })
                .unwrap_or_default();
                self.settle(|w| {
                    matches!(w, Wait::Pong(p, n) if *p == peer && *n == nonce)
                        .then(|| Ok(v.clone()))
                });
            }
        }
    }

    /// Remembers whether the session with `name` is up: one that is when
    /// the daemon stops (a stop of ours ends sessions without a
    /// `PeerDown`, a kill ends nothing) is resumed at the next start.
    fn note_session(&mut self, name: &str, up: bool) {
        if let Err(e) = self.store.set_session(name, up) {
            tracing::error!(error = %e, "STORE(WRITE_FAILED)");
        }
    }

    pub(super) fn pin(&mut self, name: &str, identity: &PublicIdentity) {
        if let Err(e) = self.store.pin(name, identity) {
            tracing::error!(error = %e, "STORE(WRITE_FAILED)");
        }
    }

    pub(super) fn broadcast(&mut self, event: Event) {
        let Ok(line) = serde_json::to_string(&event) else {
            return;
        };
        self.watchers.retain(|conn, out| {
            let ok = out.send(Out::Event(line.clone()));
            if !ok {
                tracing::warn!(conn, "CONTROL(WATCHER_TOO_SLOW_DROPPED)");
            }
            ok
        });
    }
}

/// Writes what `events` change: runs of one peer's messages together,
/// and its acknowledgements as ranges of numbers.
fn write_events(
    batch: &crate::store::Batch<'_>,
    events: &[NodeEvent],
) -> Result<(), crate::store::StoreError> {
    let mut received: Vec<(u64, u64, std::borrow::Cow<str>)> = Vec::new();
    let mut from: Option<&str> = None;
    let mut acked: Option<(&str, u64, u64)> = None;
    for e in events {
        match e {
            NodeEvent::Delivered {
                peer,
                seq,
                sent_ms,
                body,
            } => {
                if from.is_some_and(|f| f != peer) {
                    write_received(batch, from.take(), &mut received)?;
                }
                from = Some(peer);
                received.push((*seq, *sent_ms, proto::control::utf8(body)));
            }
            NodeEvent::Acked { peer, seq } => match &mut acked {
                Some((p, _, to)) if *p == peer && *to == *seq => *to += 1,
                _ => {
                    if let Some((p, lo, hi)) = acked.replace((peer, *seq, *seq + 1)) {
                        batch.delivered_range(p, lo, hi)?;
                    }
                }
            },
            _ => {}
        }
    }
    write_received(batch, from, &mut received)?;
    if let Some((p, lo, hi)) = acked {
        batch.delivered_range(p, lo, hi)?;
    }
    Ok(())
}

/// Stores the messages gathered from `peer`, if any.
fn write_received(
    batch: &crate::store::Batch<'_>,
    peer: Option<&str>,
    msgs: &mut Vec<(u64, u64, std::borrow::Cow<str>)>,
) -> Result<(), crate::store::StoreError> {
    if let Some(peer) = peer {
        let rows: Vec<(u64, u64, &str)> = msgs.iter().map(|(s, t, b)| (*s, *t, &**b)).collect();
        batch.received_many(peer, &rows)?;
    }
    msgs.clear();
    Ok(())
}
