//! `p2pctl` without a daemon: clear errors and stable exit codes. (The
//! end-to-end tests in `tests/` cover it with one.)

use std::process::Command;

fn p2pctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_p2pctl"))
        .args(args)
        .env_remove("P2PD_SOCKET")
        .output()
        .expect("run p2pctl")
}

#[test]
fn no_daemon_exits_3_and_says_how_to_start_one() {
    let out = p2pctl(&["--socket", "/nonexistent/p2pd.sock", "whoami"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach p2pd"), "{err}");
    assert!(err.contains("systemctl --user start p2pd"), "{err}");
}

#[test]
fn bad_arguments_exit_2() {
    assert_eq!(p2pctl(&["send"]).status.code(), Some(2));
    assert_eq!(p2pctl(&["frobnicate"]).status.code(), Some(2));
    let help = p2pctl(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Exit status"));
}
