//! NAT traversal on real NATs: the lab of `e2e::natlab` (network
//! namespaces, nftables routers), real `rendezvous` and `p2pd` processes
//! inside it, driven only through `p2pctl`.
//!
//! Each test builds its own lab and deletes it. Without root or nftables
//! the tests print SKIPPED and pass, unless `P2P_REQUIRE_NATLAB=1`.

use e2e::natlab::{Capture, Host, Nat, Net, Router, SERVER_V4};
use e2e::{content, transfers, Lab};
use serde_json::Value;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
/// The first byte of every datagram (these tests look at the wire from
/// outside, as a capture would).
const WIRE_VERSION: u8 = proto::wire::VERSION;

/// A lab with the rendezvous server on the public segment.
fn lab(tag: &str) -> Option<(Net, Lab)> {
    let net = Net::new(tag)?;
    let mut lab = Lab::new(tag);
    lab.server = Some(format!("{SERVER_V4}:7000"));
    let public = net.public.clone();
    lab.start_rendezvous_in(Some(&public), &[]);
    Some((net, lab))
}

fn daemon(lab: &mut Lab, name: &str, host: &Host) {
    // The default listen address: IPv4 and IPv6 on one socket.
    lab.start_daemon_in(Some(&host.ns), name, &[]);
    registered(lab, name);
}

/// A host behind each router, alice's and bob's, with their daemons up
/// and logged in.
fn alice_and_bob(net: &mut Net, lab: &mut Lab, ra: &Router, rb: &Router) -> (Host, Host) {
    let (ha, hb) = (net.host(ra), net.host(rb));
    daemon(lab, "alice", &ha);
    daemon(lab, "bob", &hb);
    (ha, hb)
}

/// Two home routers that forward IPv4 only, a host behind each, alice's
/// and bob's daemons on them, registered and logged in.
fn home_pair(tag: &str) -> Option<(Net, Lab, Router, Router, Host, Host)> {
    let (mut net, mut lab) = lab(tag)?;
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    net.block_v6(&ra);
    net.block_v6(&rb);
    let (ha, hb) = alice_and_bob(&mut net, &mut lab, &ra, &rb);
    Some((net, lab, ra, rb, ha, hb))
}

/// What each side received from the other, in order, is exactly `want`.
fn assert_received(lab: &Lab, want: [(&str, &str, Vec<&str>); 2]) {
    for (who, from, want) in want {
        assert_eq!(incoming(lab, who, from), want, "each once, in order");
    }
}

/// Registers `name` and waits until it is logged in (and has probed its
/// NAT, which takes one more round trip).
fn registered(lab: &mut Lab, name: &str) {
    lab.ctl(name, &["register", name]).ok();
    lab.wait_for("the login", WAIT, |lab| {
        let w = lab.ctl(name, &["--json", "whoami"]).json();
        (w["server_state"] == "logged_in").then_some(())
    });
    let log = lab.dir.join(format!("{name}.log"));
    lab.wait_for("the NAT probe", WAIT, |_| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("NAT(MAPPING)") || text.contains("NAT(PROBE_UNANSWERED)")).then_some(())
    });
}

/// The `peers` entry for `peer` as `daemon` shows it.
fn peer(lab: &Lab, daemon: &str, peer: &str) -> Value {
    let out = lab.ctl(daemon, &["--json", "peers"]).json();
    out["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == peer).cloned())
        .unwrap_or(Value::Null)
}

fn established(lab: &Lab, daemon: &str, other: &str) -> Option<Value> {
    let p = peer(lab, daemon, other);
    (p["state"] == "established").then_some(p)
}

/// `a` connects to `b`, `b` accepts; returns how long after `accept` both
/// saw the session up, and both `peers` entries.
fn connect(lab: &mut Lab, a: &str, b: &str) -> (Duration, Value, Value) {
    let connect = {
        let socket = lab.socket(a);
        let b = b.to_owned();
        std::thread::spawn(move || e2e::p2pctl(&socket, &["connect", &b], None))
    };
    lab.wait_for("the connection request", WAIT, |lab| {
        let p = lab.ctl(b, &["--json", "peers"]).json();
        let asked = p["requests"]
            .as_array()
            .is_some_and(|r| r.iter().any(|u| u["name"] == a));
        asked.then_some(())
    });
    let accepted = Instant::now();
    lab.ctl(b, &["accept", a]).ok();
    let (pa, pb) = lab.wait_for("the session on both sides", WAIT, |lab| {
        Some((established(lab, a, b)?, established(lab, b, a)?))
    });
    let took = accepted.elapsed();
    connect.join().expect("connect thread").ok();
    (took, pa, pb)
}

/// Messages both ways arrive, checked in the receiver's history.
/// The texts `who` received from `from`, in order.
fn incoming(lab: &Lab, who: &str, from: &str) -> Vec<String> {
    let h = lab
        .ctl(who, &["--json", "history", from, "-n", "100"])
        .json();
    h.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["direction"] == "in")
        .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn chat(lab: &mut Lab, a: &str, b: &str, text: &str) {
    lab.ctl(a, &["send", b, &format!("{text} from {a}")]).ok();
    lab.ctl(b, &["send", a, &format!("{text} from {b}")]).ok();
    for (who, from) in [(b, a), (a, b)] {
        let want = format!("{text} from {from}");
        lab.wait_for("the message", WAIT, |lab| {
            let h = lab
                .ctl(who, &["--json", "history", from, "-n", "100"])
                .json();
            h.as_array()
                .is_some_and(|m| m.iter().any(|m| m["text"] == want.as_str()))
                .then_some(())
        });
    }
}

#[test]
fn two_home_routers_connect_directly() {
    let Some((mut net, mut lab)) = lab("home") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    // IPv4 only: the path must go through both NATs.
    net.block_v6(&ra);
    net.block_v6(&rb);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);

    let (took, pa, pb) = connect(&mut lab, "alice", "bob");
    println!("direct session up {took:?} after accept");
    // Each sees the other at its router's public address: a direct path
    // through both NATs, not a relay and not a local address.
    let ea = pa["endpoint"].as_str().unwrap_or_default().to_owned();
    let eb = pb["endpoint"].as_str().unwrap_or_default().to_owned();
    assert!(ea.starts_with(&format!("{}:", rb.wan)), "{pa}");
    assert!(eb.starts_with(&format!("{}:", ra.wan)), "{pb}");
    chat(&mut lab, "alice", "bob", "hello");
}

#[test]
fn two_hosts_behind_one_router_talk_over_the_lan() {
    let Some((mut net, mut lab)) = lab("lan") else {
        return;
    };
    let r = net.router(Nat::Home);
    let (ha, hb) = (net.host(&r), net.host(&r));
    daemon(&mut lab, "alice", &ha);
    daemon(&mut lab, "bob", &hb);
    let (_, pa, pb) = connect(&mut lab, "alice", "bob");
    // Straight over the LAN (IPv4 or IPv6), not hairpinned through the
    // router's WAN side.
    let ea = pa["endpoint"].as_str().unwrap_or_default().to_owned();
    let eb = pb["endpoint"].as_str().unwrap_or_default().to_owned();
    let local = |e: &str, h: &Host| {
        e.starts_with(&format!("{}:", h.v4)) || e.starts_with(&format!("[{}]:", h.v6))
    };
    assert!(local(&ea, &hb), "{pa}");
    assert!(local(&eb, &ha), "{pb}");
    chat(&mut lab, "alice", "bob", "hi neighbour");
}

#[test]
fn double_nat_connects() {
    let Some((mut net, mut lab)) = lab("cgn") else {
        return;
    };
    let cgn = net.cgnat();
    let ra = net.router_behind(&cgn, Nat::Home);
    let rb = net.router(Nat::Home);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (_, pa, _) = connect(&mut lab, "alice", "bob");
    println!("double NAT: alice reaches bob at {}", pa["endpoint"]);
    chat(&mut lab, "alice", "bob", "through two NATs");
}

#[test]
fn symmetric_nats_on_both_sides_are_relayed_and_the_relay_reads_nothing() {
    let Some((mut net, mut lab)) = lab("sym2") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Symmetric), net.router(Nat::Symmetric));
    net.block_v6(&ra);
    net.block_v6(&rb);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (took, pa, pb) = connect(&mut lab, "alice", "bob");
    println!("relayed session up {took:?} after accept");
    let server = format!("{SERVER_V4}:7000");
    for p in [&pa, &pb] {
        assert_eq!(p["path"], "relay-udp", "{p}");
        assert_eq!(p["endpoint"], server.as_str(), "{p}");
    }
    // Everything crossing the public segment, where the relay is: the
    // messages cross it, and not one of their bytes is readable there.
    let capture = Capture::start(&net.public);
    let secret = "the eagle lands at midnight";
    chat(&mut lab, "alice", "bob", secret);
    let frames = capture.finish();
    // Ethernet, IPv4 and UDP headers (42 bytes), then our version byte and
    // the relay packet type.
    let relayed = frames
        .iter()
        .filter(|f| f.len() > 44 && f[42] == WIRE_VERSION && f[43] == 7)
        .count();
    assert!(
        relayed >= 4,
        "saw {} frames, {relayed} relayed",
        frames.len()
    );
    for f in &frames {
        assert!(
            !f.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "plaintext on the wire"
        );
    }
    println!("{relayed} relay frames on the public segment, none readable");
}

#[test]
fn symmetric_nat_on_one_side_is_relayed_then_direct_by_port_prediction() {
    let Some((mut net, mut lab)) = lab("sym1") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Symmetric), net.router(Nat::Home));
    // IPv4 only, so the direct path must come through the NATs.
    net.block_v6(&ra);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let accepted = Instant::now();
    let (took, pa, pb) = connect(&mut lab, "alice", "bob");
    println!("session up {took:?} after accept: {pa} / {pb}");
    // Plain punching cannot work here: up through the relay first (or
    // already direct, if the prediction was quicker than the relay).
    for p in [&pa, &pb] {
        assert!(
            p["path"] == "relay-udp" || p["technique"] == "port-prediction",
            "{p}"
        );
    }
    let (pa, pb) = lab.wait_for("port prediction", WAIT, |lab| {
        let pa = peer(lab, "alice", "bob");
        let pb = peer(lab, "bob", "alice");
        (pa["path"] == "direct" && pb["path"] == "direct").then_some((pa, pb))
    });
    println!(
        "direct {:?} after accept: alice {pa}, bob {pb}",
        accepted.elapsed()
    );
    // Alice (hard side) reaches bob's public address from the extra
    // socket that matched; bob reaches the port of alice's NAT he guessed.
    assert_eq!(pa["technique"], "port-prediction", "{pa}");
    assert_eq!(pb["technique"], "port-prediction", "{pb}");
    assert!(
        pa["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{}:", rb.wan)),
        "{pa}"
    );
    assert!(
        pb["endpoint"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{}:", ra.wan)),
        "{pb}"
    );
    chat(&mut lab, "alice", "bob", "through a symmetric NAT");
}

/// How many introductions the server made so far (its log).
fn introductions(lab: &Lab) -> usize {
    std::fs::read_to_string(lab.dir.join("rendezvous.log"))
        .unwrap_or_default()
        .matches("INTRO(PUNCH)")
        .count()
}

/// Sends one message and waits up to `limit` for it; returns how long
/// that took.
fn one_message(lab: &mut Lab, from: &str, to: &str, text: &str, limit: Duration) -> Duration {
    let sent = Instant::now();
    lab.ctl(from, &["send", to, text]).ok();
    lab.wait_for("the message", limit, |lab| {
        let h = lab
            .ctl(to, &["--json", "history", from, "-n", "100"])
            .json();
        h.as_array()
            .is_some_and(|m| m.iter().any(|m| m["text"] == text))
            .then_some(())
    });
    sent.elapsed()
}

#[test]
fn an_idle_session_outlives_the_mapping_timeout_on_keepalives() {
    let Some((mut net, mut lab)) = lab("idle") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    // Routers forget idle UDP mappings after 6 s here (30 s in the field);
    // the daemons keep alive every 2 s (25 s by default): the same ratio
    // of keepalive to timeout, five times quicker.
    net.udp_timeout(&ra, 6);
    net.udp_timeout(&rb, 6);
    net.block_v6(&ra);
    net.block_v6(&rb);
    let (ha, hb) = (net.host(&ra), net.host(&rb));
    for (name, host) in [("alice", &ha), ("bob", &hb)] {
        lab.start_daemon_in(Some(&host.ns), name, &["--keepalive", "2"]);
        registered(&mut lab, name);
    }
    let (_, pa, _) = connect(&mut lab, "alice", "bob");
    assert_eq!(pa["path"], "direct", "{pa}");
    let intros = introductions(&lab);
    lab.watch("alice");
    // Idle for five mapping timeouts.
    std::thread::sleep(Duration::from_secs(30));
    let pa = peer(&lab, "alice", "bob");
    assert_eq!(pa["state"], "established", "{pa}");
    assert_eq!(pa["path"], "direct", "{pa}");
    let took = one_message(&mut lab, "bob", "alice", "still there?", WAIT);
    println!("first message after 30 s idle took {took:?}");
    // No new introduction, no session that went down and up again, and
    // no detour: the direct path stayed open all along.
    assert_eq!(introductions(&lab), intros);
    let events = lab.watched("alice");
    assert!(
        !events
            .iter()
            .any(|e| ["peer_down", "peer_up", "path_changed"]
                .contains(&e["event"].as_str().unwrap_or(""))),
        "{events:?}"
    );
    let pa = peer(&lab, "alice", "bob");
    assert_eq!(pa["path"], "direct", "{pa}");
}

#[test]
fn a_router_that_forgets_its_mappings_mid_conversation_loses_nothing() {
    let Some((net, mut lab, ra, _rb, _ha, _hb)) = home_pair("rebind") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // Alice's router forgets every mapping, as a rebooted or rebinding NAT
    // does; bob talks first, into a router that no longer knows him.
    net.flush_mappings(&ra);
    // The bound is not a measurement: the issue asks for recovery within
    // 5 s, and without it the message would wait for alice's next
    // keepalive (25 s), well past these 10 s.
    let took = one_message(
        &mut lab,
        "bob",
        "alice",
        "after the flush",
        Duration::from_secs(10),
    );
    println!("first message after the flush took {took:?}");
    let took = one_message(&mut lab, "alice", "bob", "and back", WAIT);
    println!("answer took {took:?}");
    // Nothing lost, nothing doubled, in order, both ways.
    assert_received(
        &lab,
        [
            ("alice", "bob", vec!["before from bob", "after the flush"]),
            ("bob", "alice", vec!["before from alice", "and back"]),
        ],
    );
}

#[test]
fn a_host_whose_network_goes_away_and_comes_back_loses_nothing() {
    let Some((net, mut lab, _ra, rb, _ha, bob_host)) = home_pair("netdown") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // Bob's network goes away (his Wi-Fi drops) while alice talks.
    net.link_down(&bob_host);
    for i in 0..5 {
        lab.ctl("alice", &["send", "bob", &format!("while away {i}")])
            .ok();
        std::thread::sleep(Duration::from_secs(2));
    }
    // Back: the daemon sees the link come up and tries at once.
    net.link_up(&bob_host, &rb);
    let back = Instant::now();
    let took = lab.wait_for("the lines at bob", Duration::from_secs(90), |lab| {
        (incoming(lab, "bob", "alice").len() == 6).then(|| back.elapsed())
    });
    println!("bob had every line {took:?} after his network came back");
    let got = incoming(&lab, "bob", "alice");
    let mut want = vec!["before from alice".to_owned()];
    want.extend((0..5).map(|i| format!("while away {i}")));
    assert_eq!(got, want, "each once, in order");
    assert!(lab.logs().contains("NETWORK(CHANGED)"), "the daemon saw it");
}

#[test]
fn a_network_that_drops_udp_falls_back_to_tcp_and_is_relayed() {
    let Some((mut net, mut lab)) = lab("tcp") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::UdpBlocked), net.router(Nat::Home));
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (took, pa, pb) = connect(&mut lab, "alice", "bob");
    println!("session up {took:?} after accept: alice {pa}, bob {pb}");
    assert_eq!(pa["path"], "relay-tcp", "{pa}");
    assert_eq!(pb["path"], "relay-udp", "{pb}");
    chat(&mut lab, "alice", "bob", "through a firewall");
    let log = std::fs::read_to_string(lab.dir.join("alice.log")).unwrap_or_default();
    assert!(log.contains("SERVER(TCP_UP)"), "{log}");

    // The network stops dropping UDP: within a UDP retry (30 s) alice is
    // back on UDP, and the session carries on.
    net.allow_udp(&ra);
    let log = lab.dir.join("alice.log");
    lab.wait_for("the link back on UDP", Duration::from_secs(60), |_| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("SERVER(UDP_BACK_LEAVE_TCP)").then_some(())
    });
    lab.wait_for("the login over UDP", WAIT, |lab| {
        let w = lab.ctl("alice", &["--json", "whoami"]).json();
        (w["server_state"] == "logged_in").then_some(())
    });
    let pa = peer(&lab, "alice", "bob");
    assert_ne!(pa["path"], "relay-tcp", "{pa}");
    chat(&mut lab, "alice", "bob", "back on UDP");
}

#[test]
fn ipv6_goes_direct_where_ipv4_cannot() {
    let Some((mut net, mut lab)) = lab("v6") else {
        return;
    };
    // Symmetric NATs on IPv4 (no direct IPv4 path), while both hosts have
    // global IPv6 behind the routers' stateful firewalls.
    let (ra, rb) = (net.router(Nat::Symmetric), net.router(Nat::Symmetric));
    let (ha, hb) = alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (took, pa, pb) = connect(&mut lab, "alice", "bob");
    println!("session up {took:?} after accept: {pa} / {pb}");
    // Possibly relayed first, then direct over IPv6 once the probes meet.
    let want_a = format!("[{}]:", hb.v6);
    let want_b = format!("[{}]:", ha.v6);
    let (pa, pb) = lab.wait_for("a direct IPv6 path", WAIT, |lab| {
        let pa = peer(lab, "alice", "bob");
        let pb = peer(lab, "bob", "alice");
        let ok = pa["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with(&want_a))
            && pb["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(&want_b));
        ok.then_some((pa, pb))
    });
    assert_eq!(pa["path"], "direct", "{pa}");
    assert_eq!(pb["path"], "direct", "{pb}");
    chat(&mut lab, "alice", "bob", "over IPv6");
}

#[test]
fn a_relayed_session_moves_to_a_direct_path_when_one_opens() {
    let Some((mut net, mut lab)) = lab("upgrade") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    // A firewall between the two routers: only the relay gets through.
    net.block(&ra, &rb);
    let (_, hb) = alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (_, pa, _) = connect(&mut lab, "alice", "bob");
    assert_eq!(pa["path"], "relay-udp", "{pa}");
    lab.watch("alice");
    // Past the first search (the 10 s of punching), so that what finds
    // the path is a later one.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(peer(&lab, "alice", "bob")["path"], "relay-udp");
    net.unblock(&ra);
    let unblocked = Instant::now();
    // The next direct-path search (every 30 s while relayed) finds it.
    let pa = lab.wait_for(
        "the upgrade to a direct path",
        Duration::from_secs(60),
        |lab| {
            let pa = peer(lab, "alice", "bob");
            let pb = peer(lab, "bob", "alice");
            (pa["path"] == "direct" && pb["path"] == "direct").then_some(pa)
        },
    );
    println!("direct {:?} after the firewall opened", unblocked.elapsed());
    // Over IPv4 through bob's router, or over IPv6: both are direct.
    let endpoint = pa["endpoint"].as_str().unwrap_or("").to_owned();
    assert!(
        endpoint.starts_with(&format!("{}:", rb.wan))
            || endpoint.starts_with(&format!("[{}]:", hb.v6)),
        "{pa}"
    );
    let events = lab.watched("alice");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "path_changed" && e["path"] == "direct"),
        "{events:?}"
    );
    chat(&mut lab, "alice", "bob", "now direct");
}

#[test]
fn lossy_jittery_links_still_punch_through_and_lose_nothing() {
    let Some((mut net, mut lab)) = lab("lossy") else {
        return;
    };
    // Each WAN link: 20 ms ± 10 ms each way (so packets reorder), 3% loss,
    // 2% duplication.
    let impair = [
        "--delay-ms",
        "20",
        "--jitter-ms",
        "10",
        "--loss-pct",
        "3",
        "--dup-pct",
        "2",
    ];
    let ra = net.router_via_link(Nat::Home, &impair);
    let rb = net.router_via_link(Nat::Home, &impair);
    net.block_v6(&ra);
    net.block_v6(&rb);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (took, pa, _) = connect(&mut lab, "alice", "bob");
    println!("session up {took:?} after accept: {pa}");
    // A lost handshake may bring it up through the relay first; the
    // direct path follows within the punching window.
    lab.wait_for("a direct path on both sides", WAIT, |lab| {
        let both = peer(lab, "alice", "bob")["path"] == "direct"
            && peer(lab, "bob", "alice")["path"] == "direct";
        both.then_some(())
    });
    let lines = |from: &str| -> Vec<String> { (0..200).map(|i| format!("{from} {i}")).collect() };
    for (from, to) in [("alice", "bob"), ("bob", "alice")] {
        let text = lines(from).join("\n") + "\n";
        lab.ctl_stdin(from, &["send", to], Some(text.as_bytes()))
            .ok();
    }
    for (who, from) in [("bob", "alice"), ("alice", "bob")] {
        let want = lines(from);
        let got = lab.wait_for("200 messages", Duration::from_secs(60), |lab| {
            let h = lab
                .ctl(who, &["--json", "history", from, "-n", "1000"])
                .json();
            let got: Vec<String> = h
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["direction"] == "in")
                .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
                .collect();
            (got.len() >= want.len()).then_some(got)
        });
        assert_eq!(got, want, "every message once, in order");
    }
}

#[test]
fn with_the_rendezvous_gone_for_good_a_restarted_peer_reaches_its_contact() {
    let Some((_net, mut lab, _ra, _rb, _ha, hb)) = home_pair("nosrv") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // Idle past the active window (10 s): alice sends nothing but her
    // 25 s keepalive, so nothing of hers reaches bob's new daemon (whose
    // proven "session unknown" would bring her back at once).
    std::thread::sleep(Duration::from_secs(11));
    // The server dies and does not come back; then bob's daemon is killed
    // and started again (on the port it had: it keeps it).
    lab.kill("rendezvous");
    lab.kill("bob");
    lab.start_daemon_in(Some(&hb.ns), "bob", &[]);
    let back = Instant::now();
    // bob speaks first: his daemon has to find alice by itself (she has
    // nothing to say, so nothing of hers shows him the way).
    let took = one_message(&mut lab, "bob", "alice", "none needed", WAIT);
    println!("bob to alice {took:?} after bob's restart, without a server");
    one_message(&mut lab, "alice", "bob", "no server", WAIT);
    println!("and back {:?} after bob's restart", back.elapsed());
    assert_received(
        &lab,
        [
            ("alice", "bob", vec!["before from bob", "none needed"]),
            ("bob", "alice", vec!["before from alice", "no server"]),
        ],
    );
    // `peers` says so, and what still works.
    let p = lab.ctl("bob", &["--json", "peers"]).json();
    assert!(p["server_away_s"].as_f64().is_some(), "{p}");
    assert_eq!(p["peers"][0]["path"], "direct", "{p}");
    lab.wait_for("`peers` to say there is no server", WAIT, |lab| {
        let text = lab.ctl("bob", &["peers"]);
        text.ok().starts_with("no server (").then_some(())
    });
    assert!(lab.logs().contains("RECONNECT(DIRECT_WITHOUT_SERVER)"));
}

#[test]
fn a_peer_killed_and_restarted_on_a_new_port_is_back_with_nothing_lost() {
    let Some((_net, mut lab, _ra, _rb, _ha, hb)) = home_pair("kill") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    lab.kill("bob");
    // alice goes on talking into the silence.
    for i in 0..3 {
        lab.ctl("alice", &["send", "bob", &format!("while dead {i}")])
            .ok();
    }
    // Another port than the one it had (as if that one were taken).
    lab.start_daemon_in(Some(&hb.ns), "bob", &["--listen", "0.0.0.0:47001"]);
    let back = Instant::now();
    let took = one_message(&mut lab, "alice", "bob", "after", WAIT);
    println!("first new message {took:?} after bob's restart");
    let mut want = vec!["before from alice".to_owned()];
    want.extend((0..3).map(|i| format!("while dead {i}")));
    want.push("after".into());
    lab.wait_for("every line at bob", WAIT, |lab| {
        (incoming(lab, "bob", "alice").len() == want.len()).then_some(())
    });
    println!("all lines {:?} after bob's restart", back.elapsed());
    assert_eq!(incoming(&lab, "bob", "alice"), want, "each once, in order");
}

#[test]
fn udp_blocked_mid_conversation_moves_to_the_tcp_relay_and_back() {
    let Some((mut net, mut lab)) = lab("udpmid") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    net.block_v6(&ra);
    net.block_v6(&rb);
    let (ha, hb) = (net.host(&ra), net.host(&rb));
    // The default heartbeat (25 s): what notices the block must not be
    // heartbeats timing out (75 s).
    for (name, host) in [("alice", &ha), ("bob", &hb)] {
        lab.start_daemon_in(Some(&host.ns), name, &["--heartbeat", "25"]);
        registered(&mut lab, name);
    }
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // A firewall rule on alice's router drops UDP, the flows under way
    // too; bob talks, alice only listens.
    net.block_udp(&ra);
    let took = one_message(&mut lab, "bob", "alice", "over tcp", WAIT);
    println!("bob to alice {took:?} after UDP was blocked");
    one_message(&mut lab, "alice", "bob", "tcp reply", WAIT);
    let pa = peer(&lab, "alice", "bob");
    assert_eq!(pa["path"], "relay-tcp", "{pa}");
    assert!(lab.logs().contains("SERVER(UDP_CHECK_FAILED_TRY_TCP)"));
    // UDP is let through again: the next UDP probe (2 s after the move to
    // TCP, then at doubling intervals up to 30 s) moves the
    // link back, and the session with it.
    net.unblock_udp(&ra);
    let back = Instant::now();
    lab.wait_for("the session off TCP", Duration::from_secs(90), |lab| {
        let pa = peer(lab, "alice", "bob");
        (pa["state"] == "established" && pa["path"] != "relay-tcp").then_some(())
    });
    println!("off TCP {:?} after UDP came back", back.elapsed());
    one_message(&mut lab, "bob", "alice", "udp again", WAIT);
    assert_received(
        &lab,
        [
            (
                "alice",
                "bob",
                vec!["before from bob", "over tcp", "udp again"],
            ),
            ("bob", "alice", vec!["before from alice", "tcp reply"]),
        ],
    );
}

#[test]
fn a_relayed_session_is_back_soon_after_the_rendezvous_restarts() {
    let Some((mut net, mut lab)) = lab("srvrestart") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    // Only the relay gets through.
    net.block(&ra, &rb);
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    let (_, pa, _) = connect(&mut lab, "alice", "bob");
    assert_eq!(pa["path"], "relay-udp", "{pa}");
    chat(&mut lab, "alice", "bob", "before");
    lab.kill("rendezvous");
    lab.ctl("alice", &["send", "bob", "while the server is down"])
        .ok();
    std::thread::sleep(Duration::from_secs(2));
    let public = net.public.clone();
    lab.start_rendezvous_in(Some(&public), &[]);
    let took = one_message(&mut lab, "alice", "bob", "after", WAIT);
    println!("first message {took:?} after the rendezvous restarted");
    one_message(&mut lab, "bob", "alice", "reply", WAIT);
    assert_received(
        &lab,
        [
            ("alice", "bob", vec!["before from bob", "reply"]),
            (
                "bob",
                "alice",
                vec!["before from alice", "while the server is down", "after"],
            ),
        ],
    );
}

#[test]
fn a_daemon_stopped_and_continued_loses_nothing() {
    let Some((_net, mut lab, _ra, _rb, _ha, _hb)) = home_pair("sigstop") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // bob's laptop lid closes (the process is stopped, its sockets stay);
    // alice talks meanwhile; her session gives up on him.
    lab.signal("bob", "STOP");
    for i in 0..3 {
        lab.ctl("alice", &["send", "bob", &format!("while stopped {i}")])
            .ok();
        std::thread::sleep(Duration::from_secs(4));
    }
    lab.signal("bob", "CONT");
    let took = one_message(&mut lab, "alice", "bob", "after", WAIT);
    println!("first message {took:?} after bob continued");
    let mut want = vec!["before from alice".to_owned()];
    want.extend((0..3).map(|i| format!("while stopped {i}")));
    want.push("after".into());
    lab.wait_for("every line at bob", WAIT, |lab| {
        (incoming(lab, "bob", "alice").len() == want.len()).then_some(())
    });
    assert_eq!(incoming(&lab, "bob", "alice"), want, "each once, in order");
}

#[test]
fn both_routers_rebinding_at_once_lose_nothing() {
    let Some((net, mut lab, ra, rb, _ha, _hb)) = home_pair("rebind2") else {
        return;
    };
    connect(&mut lab, "alice", "bob");
    chat(&mut lab, "alice", "bob", "before");
    // Both rebind: new public ports on both sides at once.
    net.rebind(&ra);
    net.rebind(&rb);
    let took = one_message(&mut lab, "alice", "bob", "after both", WAIT);
    println!("first message {took:?} after both routers rebound");
    one_message(&mut lab, "bob", "alice", "and back", WAIT);
    assert_received(
        &lab,
        [
            ("alice", "bob", vec!["before from bob", "and back"]),
            ("bob", "alice", vec!["before from alice", "after both"]),
        ],
    );
}

#[test]
fn a_file_in_flight_goes_on_when_both_routers_rebind() {
    let Some((mut net, mut lab)) = lab("filerebind") else {
        return;
    };
    let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
    net.block_v6(&ra);
    net.block_v6(&rb);
    // 40 Mbit/s out of alice's router: 16 MiB take about 3.5 s, so the
    // rebinding lands mid-transfer.
    e2e::natlab::exec(
        &ra.ns,
        &[
            "tc", "qdisc", "add", "dev", "wan", "root", "tbf", "rate", "40mbit", "burst", "64kb",
            "latency", "50ms",
        ],
    );
    alice_and_bob(&mut net, &mut lab, &ra, &rb);
    connect(&mut lab, "alice", "bob");
    let data = content(0x9e37_79b9_7f4a_7c15, 16 * 1024 * 1024);
    let out = lab.dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let src = out.join("film.bin");
    std::fs::write(&src, &data).unwrap();
    lab.ctl(
        "alice",
        &["send-file", "bob", src.to_str().unwrap(), "--no-wait"],
    )
    .ok();
    let id = lab.wait_for("the offer", WAIT, |lab| {
        transfers(lab, "bob")
            .into_iter()
            .find(|t| t["state"] == "offered")
            .map(|t| t["id"].as_str().unwrap_or("").to_owned())
    });
    let inbox = lab.dir.join("inbox");
    lab.ctl(
        "bob",
        &[
            "accept-file",
            &id,
            "--to",
            inbox.to_str().unwrap(),
            "--no-wait",
        ],
    )
    .ok();
    let size = data.len() as u64;
    let done = |lab: &Lab| {
        transfers(lab, "bob")
            .into_iter()
            .find(|t| t["id"] == id.as_str())
            .map(|t| (t["done"].as_u64().unwrap_or(0), t["state"].clone()))
    };
    let before = lab.wait_for("a quarter of the file", WAIT, |lab| {
        done(lab).map(|d| d.0).filter(|d| *d >= size / 4)
    });
    assert!(before < size, "the file went before the rebinding");
    net.rebind(&ra);
    net.rebind(&rb);
    // It goes on where it was (never back to the start) and arrives whole.
    let mut last = before;
    lab.wait_for("the file", Duration::from_secs(90), |lab| {
        let (d, state) = done(lab)?;
        assert!(d >= last, "went back from {last} to {d}");
        last = d;
        (state == "done").then_some(())
    });
    assert_eq!(std::fs::read(inbox.join("film.bin")).unwrap(), data);
    assert_eq!(
        transfers(&lab, "bob").len(),
        1,
        "one transfer, not a new one"
    );
    chat(&mut lab, "alice", "bob", "after the file");
}
