//! The core capability end to end: a real rendezvous server and two real
//! daemons on loopback, driven only through `p2pctl`.

use e2e::Lab;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn incoming_texts(lab: &Lab, daemon: &str, peer: &str) -> Vec<String> {
    let out = lab.ctl(daemon, &["--json", "history", peer, "-n", "5000"]);
    out.json()
        .as_array()
        .expect("history is a list")
        .iter()
        .filter(|m| m["direction"] == "in")
        .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn two_daemons_chat_through_a_rendezvous_and_survive_restarts() {
    let mut lab = Lab::new("chat");
    lab.start_rendezvous();
    lab.start_daemon("a");
    lab.start_daemon("b");

    // Register, and a name that is taken.
    let reg = lab.ctl("a", &["--json", "register", "alice"]);
    let alice_fp = reg.json()["fingerprint"].as_str().unwrap().to_owned();
    lab.ctl("b", &["register", "bob"]).ok();
    let taken = lab.ctl("b", &["register", "alice"]);
    assert!(taken.fails_with(6).contains("another key"), "{taken:?}");
    let bad = lab.ctl("b", &["register", "no spaces"]);
    bad.fails_with(2);

    // Both are listed, with the fingerprints they show themselves.
    let bob_fp = lab.ctl("b", &["--json", "whoami"]).json()["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let users = lab.ctl("a", &["--json", "users"]).json();
    let listed: Vec<(String, String)> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["name"].as_str().unwrap().into(),
                u["fingerprint"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("alice".into(), alice_fp.clone()),
            ("bob".into(), bob_fp.clone())
        ]
    );

    // Unknown users and unconnected peers fail clearly.
    lab.ctl("a", &["connect", "nobody"]).fails_with(4);
    let not = lab.ctl("a", &["send", "bob", "too early"]);
    assert!(not.fails_with(5).contains("p2pctl connect bob"), "{not:?}");

    lab.watch("b");

    // bob declines once.
    let a_dir = lab.socket("a");
    let connect = std::thread::spawn({
        let dir = a_dir.clone();
        move || e2e::p2pctl(&dir, &["connect", "bob"], None)
    });
    lab.wait_for("alice's request at bob", WAIT, |lab| {
        let peers = lab.ctl("b", &["--json", "peers"]).json();
        (peers["requests"][0]["name"] == "alice").then_some(())
    });
    lab.wait_for("the request in bob's event stream", WAIT, |lab| {
        lab.watched("b")
            .iter()
            .any(|e| e["event"] == "connect_request" && e["fingerprint"] == alice_fp.as_str())
            .then_some(())
    });
    lab.ctl("b", &["decline", "alice"]).ok();
    let declined = connect.join().unwrap();
    assert!(declined.fails_with(6).contains("declined"), "{declined:?}");
    lab.ctl("b", &["decline", "alice"]).fails_with(5);

    // Then accepts.
    let connect = std::thread::spawn({
        let dir = a_dir.clone();
        move || e2e::p2pctl(&dir, &["--json", "connect", "bob"], None)
    });
    lab.wait_for("alice's second request", WAIT, |lab| {
        let peers = lab.ctl("b", &["--json", "peers"]).json();
        (peers["requests"][0]["name"] == "alice").then_some(())
    });
    let accepted = lab.ctl("b", &["--json", "accept", "alice"]).json();
    assert_eq!(accepted["fingerprint"], alice_fp.as_str());
    let connected = connect.join().unwrap();
    connected.ok();
    assert_eq!(connected.json()["fingerprint"], bob_fp.as_str());

    // Messages both ways.
    lab.ctl("a", &["send", "bob", "hello", "bob"]).ok();
    lab.ctl_stdin("b", &["send", "alice"], Some(b"hi alice\n"))
        .ok();
    lab.wait_for("bob's reply", WAIT, |lab| {
        (incoming_texts(lab, "a", "bob") == ["hi alice"]).then_some(())
    });

    // A peer's text cannot forge lines or drive the terminal: control
    // characters are shown escaped.
    let evil = "evil\n12:00:00 <carol> forged \u{1b}[31mred\u{7}";
    lab.ctl("b", &["send", "alice", evil]).ok();
    lab.wait_for("the evil line at alice", WAIT, |lab| {
        (incoming_texts(lab, "a", "bob").last().map(String::as_str) == Some(evil)).then_some(())
    });
    let shown = lab.ctl("a", &["history", "bob", "-n", "1"]);
    let shown = shown.ok();
    assert_eq!(shown.lines().count(), 1, "{shown:?}");
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
        "{shown:?}"
    );
    assert!(shown.contains("\\n12:00:00 <carol>"), "{shown:?}");

    // A thousand piped lines: all delivered, once, in order.
    let lines: String = (1..=1000).map(|i| format!("line {i}\n")).collect();
    let sent = lab.ctl_stdin("a", &["send", "bob"], Some(lines.as_bytes()));
    assert!(sent.ok().contains("sent 1000 messages"), "{sent:?}");
    let mut expect = vec!["hello bob".to_string()];
    expect.extend((1..=1000).map(|i| format!("line {i}")));
    lab.wait_for("1000 lines at bob", WAIT, |lab| {
        (incoming_texts(lab, "b", "alice").len() >= expect.len()).then_some(())
    });
    assert_eq!(incoming_texts(&lab, "b", "alice"), expect);
    // The watcher saw the same stream.
    let watched_messages = |lab: &Lab| -> Vec<String> {
        lab.watched("b")
            .iter()
            .filter(|e| e["event"] == "message")
            .map(|e| e["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let streamed = lab.wait_for("1000 lines in bob's event stream", WAIT, |lab| {
        let m = watched_messages(lab);
        (m.len() >= expect.len()).then_some(m)
    });
    assert_eq!(streamed, expect);
    // And alice's side knows they were delivered.
    lab.wait_for("acknowledgements at alice", WAIT, |lab| {
        let h = lab
            .ctl("a", &["--json", "history", "bob", "-n", "5000"])
            .json();
        h.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["direction"] == "out")
            .all(|m| m["state"] == "delivered")
            .then_some(())
    });

    // A line over the size limit in the middle of a pipe: refused with
    // its line number and the limit; the lines after it still go, and
    // the status says some were refused.
    let long = "x".repeat(proto::wire::MAX_MESSAGE_BYTES + 1);
    let piped = format!("before the long one\n{long}\nafter the long one\n");
    let out = lab.ctl_stdin("a", &["send", "bob"], Some(piped.as_bytes()));
    let err = out.fails_with(2);
    assert!(err.contains("line 2: message of"), "{err}");
    assert!(
        err.contains(&format!("at most {} bytes", proto::wire::MAX_MESSAGE_BYTES)),
        "{err}"
    );
    assert!(err.contains("2 messages sent to bob, 1 refused"), "{err}");
    lab.wait_for("the line after the long one", WAIT, |lab| {
        let texts = incoming_texts(lab, "b", "alice");
        texts
            .ends_with(&["before the long one".into(), "after the long one".into()])
            .then_some(())
    });
    expect.extend(["before the long one".into(), "after the long one".into()]);

    // Ping, close, and what a closed session says.
    let ping = lab.ctl("a", &["--json", "ping", "bob"]).json();
    assert!(ping["rtt_ms"].as_f64().unwrap() >= 0.0);
    lab.ctl("a", &["close", "bob"]).ok();
    lab.ctl("a", &["ping", "bob"]).fails_with(5);
    lab.wait_for("bob sees the close", WAIT, |lab| {
        lab.watched("b")
            .iter()
            .any(|e| e["event"] == "peer_down")
            .then_some(())
    });

    // bob's daemon stops; alice queues; bob comes back and gets them.
    assert_eq!(lab.stop("b"), 0, "p2pd exits 0 on SIGTERM");
    assert!(!lab.socket("b").exists(), "the control socket is removed");
    for i in 1..=3 {
        let q = lab
            .ctl("a", &["--json", "send", "bob", &format!("queued {i}")])
            .json();
        assert_eq!(q["queued"], true);
    }
    lab.start_daemon("b");
    lab.wait_for(
        "queued messages at restarted bob",
        Duration::from_secs(60),
        |lab| {
            let got = incoming_texts(lab, "b", "alice");
            (got.len() >= expect.len() + 3).then_some(got)
        },
    );
    let mut expect_all = expect.clone();
    expect_all.extend((1..=3).map(|i| format!("queued {i}")));
    assert_eq!(incoming_texts(&lab, "b", "alice"), expect_all);

    // The rendezvous crashes and restarts; both daemons log in again by
    // themselves (their accounts were on disk before it answered).
    lab.kill("rendezvous");
    lab.wait_for("daemons notice the server is gone", WAIT, |lab| {
        let s = lab.ctl("a", &["--json", "whoami"]).json();
        (s["server_state"] != "logged_in").then_some(())
    });
    lab.start_rendezvous();
    lab.wait_for("both logged in again", Duration::from_secs(60), |lab| {
        let a = lab.ctl("a", &["--json", "whoami"]).json();
        let b = lab.ctl("b", &["--json", "whoami"]).json();
        (a["server_state"] == "logged_in" && b["server_state"] == "logged_in").then_some(())
    });
    let users = lab.ctl("b", &["--json", "users"]).json();
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");
    // And a login on request works too.
    let login = lab.ctl("a", &["login"]);
    assert!(login.ok().starts_with("logged in as alice"), "{login:?}");
}

#[test]
fn a_peer_killed_mid_chat_comes_back_on_a_new_port_and_nothing_is_lost() {
    let mut lab = Lab::connected_pair("killed");
    let lines = |from: usize, to: usize| -> Vec<u8> {
        (from..to)
            .map(|i| format!("line {i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    lab.ctl_stdin("a", &["send", "bob"], Some(&lines(0, 20)))
        .ok();
    lab.wait_for("the first lines at bob", WAIT, |lab| {
        (incoming_texts(lab, "b", "alice").len() == 20).then_some(())
    });
    // Killed (no goodbye): alice goes on talking to its old address.
    lab.kill("b");
    lab.ctl_stdin("a", &["send", "bob"], Some(&lines(20, 39)))
        .ok();
    // Within seconds alice's daemon knows, and says so truthfully.
    let trouble = lab.wait_for("alice to see bob silent", WAIT, |lab| {
        let peers = lab.ctl("a", &["--json", "peers"]).json();
        let bob = peers["peers"][0].clone();
        (bob["unanswered_s"].is_number() || bob["down_s"].is_number()).then_some(bob)
    });
    let sent = lab.ctl("a", &["--json", "send", "bob", "line 39"]).json();
    assert_eq!(sent["queued"], true, "{sent} (peers: {trouble})");
    assert!(
        sent["reason"].as_str().is_some_and(|r| r.contains("bob")),
        "{sent}"
    );
    // Back, on another port (port 0 picks a new one), with its database.
    lab.start_daemon("b");
    let back = std::time::Instant::now();
    lab.ctl_stdin("a", &["send", "bob"], Some(&lines(40, 60)))
        .ok();
    lab.wait_for("every line at bob", Duration::from_secs(120), |lab| {
        (incoming_texts(lab, "b", "alice").len() >= 60).then_some(())
    });
    eprintln!("all 60 lines at bob {:?} after its restart", back.elapsed());
    let expect: Vec<String> = (0..60).map(|i| format!("line {i}")).collect();
    assert_eq!(
        incoming_texts(&lab, "b", "alice"),
        expect,
        "each once, in order"
    );
    assert!(
        lab.logs().contains("PEER(RESUME)"),
        "bob asked for the session again"
    );
}

#[test]
fn a_message_that_cannot_be_stored_fails_its_send_and_nothing_stored_is_lost() {
    // D11, chat: bob's database is on a file system that fills up. His
    // `send` fails saying the message was not stored, he keeps running,
    // what he had stored is still there, and once there is room he sends
    // again.
    let mut lab = Lab::new("cfull");
    lab.start_rendezvous();
    let data = lab.dir.join("bob");
    let Some(_tmpfs) = e2e::Tmpfs::mount(&data, "8m") else {
        return;
    };
    lab.start_daemon("alice");
    lab.start_daemon("bob");
    lab.ctl("alice", &["register", "alice"]).ok();
    lab.ctl("bob", &["register", "bob"]).ok();
    lab.log_in_and_connect("alice", "bob", Duration::from_secs(30));
    lab.ctl("bob", &["send", "alice", "stored before"]).ok();
    // Fill the file system.
    let filler = data.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 16 << 20]);
    let out = lab.ctl("bob", &["send", "alice", "no room for this"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("not stored"), "{out:?}");
    assert!(lab.running("bob"), "bob's daemon stopped");
    let history = lab.ctl("bob", &["history", "alice"]);
    assert!(history.ok().contains("stored before"), "{history:?}");
    std::fs::remove_file(&filler).unwrap();
    lab.ctl("bob", &["send", "alice", "room again"]).ok();
    lab.wait_for("the line at alice", Duration::from_secs(30), |lab| {
        let h = lab.ctl("alice", &["history", "bob"]);
        h.stdout.contains("room again").then_some(())
    });
    let h = lab.ctl("alice", &["history", "bob"]);
    assert!(!h.stdout.contains("no room for this"), "{h:?}");
}
