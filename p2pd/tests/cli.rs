//! `p2pd`'s command line refuses bad configuration before starting.

use std::process::Command;

#[test]
fn a_malformed_server_key_is_refused() {
    let dir = std::env::temp_dir().join(format!("p2pd-cli-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_p2pd"))
        .args(["--server-key", "abc", "--data-dir"])
        .arg(&dir)
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .output()
        .expect("run p2pd");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex digits"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_describes_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_p2pd"))
        .arg("--help")
        .output()
        .expect("run p2pd");
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--server",
        "--server-key",
        "--data-dir",
        "--socket",
        "--heartbeat",
    ] {
        assert!(text.contains(opt), "{opt} missing from --help");
    }
}
