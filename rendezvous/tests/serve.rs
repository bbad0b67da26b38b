//! The real server, started in-process on loopback, driven by a real
//! `proto::Node` over a real UDP socket: the shell's loop, the key
//! file and the SQLite store together, not the machine alone (which
//! `proto/tests/sim.rs` covers).

use proto::wire::{FailReason, ServerToClient};
use proto::Identity;
use proto::NoFiles;
use proto::{Node, NodeConfig, NodeEvent};
use rendezvous::{bind, Bound, Config, SqliteStore};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any one wait; loopback answers in microseconds, so this
/// only matters when something is broken, and then the test fails instead
/// of hanging.
const WAIT: Duration = Duration::from_secs(5);

/// A directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "rendezvous-serve-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).expect("create test dir");
        Self(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server and the means to stop it.
struct Running {
    addr: SocketAddr,
    key: [u8; 32],
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(dir: &Path) -> Running {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let bound: Bound = bind(Config::new(listen, dir)).await.expect("bind");
    let addr = bound.local_addr();
    assert_ne!(addr.port(), 0, "the real port is reported");
    assert!(bound
        .banner()
        .starts_with(&format!("rendezvous: listening on {addr}, server key ")));
    let key = bound.public_key();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(bound.run(async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        key,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops on shutdown")
            .expect("server task did not panic")
            .expect("server ends with Ok");
    }
}

/// One `Node` on its own loopback socket, driven the way a daemon drives
/// it: after every input drain events, then transmits, then wait for a
/// datagram or the next deadline.
struct Client {
    node: Node<NoFiles>,
    socket: UdpSocket,
    seen: Vec<NodeEvent>,
}

impl Client {
    async fn new(identity: Identity, config: NodeConfig, seed: u64) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
        let node = Node::new(identity, config, Instant::now(), seed, NoFiles);
        Self {
            node,
            socket,
            seen: Vec::new(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    /// Drives the node until an event matches `want`, and returns it.
    async fn until(&mut self, what: &str, want: impl Fn(&NodeEvent) -> bool) -> NodeEvent {
        let drive = async {
            let mut buf = vec![0u8; 2048];
            loop {
                while let Some(e) = self.node.poll_event() {
                    let hit = want(&e);
                    self.seen.push(e.clone());
                    if hit {
                        return e;
                    }
                }
                while let Some(t) = self.node.poll_transmit(Instant::now()) {
                    self.socket.send_to(&t.payload, t.dst).await.expect("send");
                }
                let deadline = self
                    .node
                    .poll_timeout()
                    .unwrap_or_else(|| Instant::now() + WAIT);
                tokio::select! {
                    r = self.socket.recv_from(&mut buf) => {
                        let (n, from) = r.expect("recv");
                        self.node.handle_datagram(Instant::now(), from, &buf[..n]);
                    }
                    () = tokio::time::sleep_until(deadline.into()) => {
                        self.node.handle_timeout(Instant::now());
                    }
                }
            }
        };
        match tokio::time::timeout(WAIT, drive).await {
            Ok(e) => e,
            Err(_) => panic!("no {what} within {WAIT:?}; events seen: {:#?}", self.seen),
        }
    }
}

#[tokio::test]
async fn registers_logs_in_and_survives_garbage() {
    let dir = TestDir::new("login");
    let server = start(dir.path()).await;

    let mut alice = Client::new(Identity::generate(), NodeConfig::new(server.addr), 1).await;
    alice.node.register(Instant::now(), "alice");
    let connected = alice
        .until("ServerConnected", |e| {
            matches!(e, NodeEvent::ServerConnected { .. })
        })
        .await;
    assert_eq!(
        connected,
        NodeEvent::ServerConnected {
            server_key: server.key,
            learned: true
        },
        "first contact learns the key the server announced"
    );
    let logged_in = alice
        .until("LoggedIn", |e| matches!(e, NodeEvent::LoggedIn { .. }))
        .await;
    assert_eq!(
        logged_in,
        NodeEvent::LoggedIn {
            name: "alice".into(),
            observed: alice.addr(),
        }
    );

    // Garbage of several shapes from a stranger: empty, a bad version, too
    // long for the protocol, too long for the receive buffer. None of it
    // earns a reply, and none of it stops the server.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [vec![], vec![0xff; 100], vec![1; 1500], vec![0x5a; 4000]] {
        stranger.send_to(&junk, server.addr).await.unwrap();
    }
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stranger.recv_from(&mut buf))
            .await
            .is_err(),
        "garbage got an answer"
    );

    // Still serving the logged-in user...
    let rid = alice.node.ping_server(Instant::now());
    let pong = alice
        .until(
            "Pong",
            |e| matches!(e, NodeEvent::Response { rid: r, .. } if *r == rid),
        )
        .await;
    assert!(
        matches!(
            pong,
            NodeEvent::Response {
                result: Ok(ServerToClient::Pong { observed, .. }),
                ..
            } if observed == alice.addr()
        ),
        "{pong:?}"
    );

    // ...and new ones, with the name already held in the database.
    let mut mallory = Client::new(Identity::generate(), NodeConfig::new(server.addr), 2).await;
    let rid = mallory.node.register(Instant::now(), "alice");
    let refused = mallory
        .until(
            "register answer",
            |e| matches!(e, NodeEvent::Response { rid: r, .. } if *r == rid),
        )
        .await;
    assert!(
        matches!(
            &refused,
            NodeEvent::Response { result: Err(proto::RequestError::Failed { reason, .. }), .. }
                if *reason == FailReason::NameTaken
        ),
        "{refused:?}"
    );

    server.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_key_and_the_accounts() {
    let dir = TestDir::new("restart");
    let identity = Identity::generate();

    let first = start(dir.path()).await;
    let key = first.key;
    let mut alice = Client::new(identity.clone(), NodeConfig::new(first.addr), 3).await;
    alice.node.register(Instant::now(), "alice");
    alice
        .until("LoggedIn", |e| matches!(e, NodeEvent::LoggedIn { .. }))
        .await;
    first.stop().await;

    // The account is on disk, readable by another connection.
    let mut store = SqliteStore::open_in(dir.path()).unwrap();
    let account = proto::AccountStore::by_name(&mut store, "alice")
        .unwrap()
        .expect("account persisted");
    assert_eq!(account.identity, identity.public());
    drop(store);

    // Same key after restart, so a client that pinned it logs straight in
    // with its stored name, without registering again.
    let second = start(dir.path()).await;
    assert_eq!(second.key, key, "server key survives a restart");
    let mut config = NodeConfig::new(second.addr);
    config.client.server_key = Some(key);
    config.client.name = Some("alice".into());
    let mut alice = Client::new(identity, config, 4).await;
    let logged_in = alice
        .until("LoggedIn after restart", |e| {
            matches!(e, NodeEvent::LoggedIn { .. })
        })
        .await;
    assert!(
        matches!(&logged_in, NodeEvent::LoggedIn { name, .. } if name == "alice"),
        "{logged_in:?}"
    );
    second.stop().await;
}
