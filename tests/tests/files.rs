//! File transfer end to end: real daemons on loopback, driven through
//! `p2pctl send-file`, `accept-file`, `transfers` and `cancel`.

use e2e::Lab;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pair(tag: &str) -> Lab {
    let mut lab = Lab::new(tag);
    lab.start_rendezvous();
    lab.start_daemon("a");
    lab.start_daemon("b");
    lab.ctl("a", &["register", "alice"]).ok();
    lab.ctl("b", &["register", "bob"]).ok();
    let socket = lab.socket("a");
    let connect = std::thread::spawn(move || e2e::p2pctl(&socket, &["connect", "bob"], None));
    lab.wait_for("the request", WAIT, |lab| {
        lab.ctl("b", &["--json", "peers"]).json()["requests"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
            .then_some(())
    });
    lab.ctl("b", &["accept", "alice"]).ok();
    connect.join().unwrap().ok();
    lab
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn transfers(lab: &Lab, who: &str) -> Vec<Value> {
    lab.ctl(who, &["--json", "transfers"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits for an offer at bob and returns its id.
fn offer_at(lab: &mut Lab, who: &str, name: &str) -> String {
    lab.wait_for("the offer", WAIT, |lab| {
        transfers(lab, who)
            .into_iter()
            .find(|t| t["state"] == "offered" && t["direction"] == "in" && t["name"] == name)
            .map(|t| t["id"].as_str().unwrap().to_owned())
    })
}

/// `p2pctl send-file` in the background (it waits until the peer has it).
fn send_in_background(
    lab: &Lab,
    who: &str,
    peer: &str,
    path: &Path,
) -> std::thread::JoinHandle<e2e::Output> {
    let socket = lab.socket(who);
    let (peer, path) = (peer.to_owned(), path.display().to_string());
    std::thread::spawn(move || e2e::p2pctl(&socket, &["send-file", &peer, &path], None))
}

#[test]
fn a_file_arrives_byte_identical_and_is_never_overwritten() {
    let mut lab = pair("files");
    let data = content(1, 3 * 1024 * 1024 + 4321);
    let src = write_file(&lab.dir.join("out"), "report.bin", &data);
    let inbox = lab.dir.join("inbox");
    for round in 0..2 {
        let sender = send_in_background(&lab, "a", "bob", &src);
        let id = offer_at(&mut lab, "b", "report.bin");
        let got = lab.ctl(
            "b",
            &["accept-file", &id[..6], "--to", inbox.to_str().unwrap()],
        );
        got.ok();
        assert!(got.stdout.contains("done"), "{got:?}");
        let sent = sender.join().unwrap();
        sent.ok();
        let name = if round == 0 {
            "report.bin"
        } else {
            "report (1).bin"
        };
        assert_eq!(std::fs::read(inbox.join(name)).unwrap(), data, "{name}");
    }
    // Two files, no partial files left, both transfers done on both sides.
    let mut names: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["report (1).bin", "report.bin"]);
    for who in ["a", "b"] {
        let t = transfers(&lab, who);
        assert_eq!(t.len(), 2);
        assert!(
            t.iter()
                .all(|t| t["state"] == "done" && t["done"] == t["size"]),
            "{t:?}"
        );
    }
}
