//! A lab for end-to-end tests: real `rendezvous`, `p2pd` and `p2pctl`
//! processes on loopback, each lab in its own temporary directory with
//! its own ports and sockets.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the
//! test executable (`target/<profile>/`); one older than its sources is
//! refused, never run ([`bin`]). Every process is killed when the
//! lab is dropped; when a test fails, the lab prints every process's log.

pub mod natlab;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where cargo put the binaries: the parent of the `deps` directory that
/// holds this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps; the lab's own binaries
    // (bench-lab) from target/<profile>.
    let dir = exe
        .parent()
        .filter(|d| d.join(name).exists())
        .or_else(|| exe.parent().and_then(|deps| deps.parent()))
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    refuse_stale(name, &path);
    path
}

/// The workspace crates each binary is built from: a binary older than
/// any of their sources was not rebuilt for this run (`cargo test -p e2e`
/// builds none of them), and testing it would test old code.
fn sources_of(name: &str) -> &'static [&'static str] {
    match name {
        "p2pd" => &["proto", "p2pd"],
        "p2pctl" => &["proto", "p2pctl"],
        "rendezvous" => &["proto", "rendezvous"],
        // The lab's own binaries are built with the tests themselves.
        _ => &[],
    }
}

/// Panics, saying what to run, when a source of `name` (or a manifest,
/// or the lock file) is newer than the binary at `path`.
fn refuse_stale(name: &str, path: &Path) {
    let crates = sources_of(name);
    if crates.is_empty() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let built = fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("binary's modification time");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut consider = |p: PathBuf| {
        if let Ok(t) = fs::metadata(&p).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, p));
            }
        }
    };
    consider(root.join("Cargo.toml"));
    consider(root.join("Cargo.lock"));
    for c in crates {
        consider(root.join(c).join("Cargo.toml"));
        let mut dirs = vec![root.join(c).join("src")];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    consider(p);
                }
            }
        }
    }
    if let Some((t, source)) = newest {
        assert!(
            t <= built,
            "{} is older than {}: it was not rebuilt for this run. \
             Run `cargo test --workspace` (or `cargo build --workspace --bins` first).",
            path.display(),
            source.display()
        );
    }
}

/// What a finished `p2pctl` run gave.
#[derive(Debug)]
pub struct Output {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "p2pctl {:?} failed: {self:#?}", self.args);
        &self.stdout
    }

    /// Asserts the exit code.
    #[track_caller]
    pub fn fails_with(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "p2pctl {:?}: {self:#?}", self.args);
        &self.stderr
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("p2pctl {:?} printed no JSON ({e}): {self:#?}", self.args))
    }
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

pub struct Lab {
    pub dir: PathBuf,
    pub server: Option<String>,
    procs: Vec<Proc>,
    /// The open-file limit (soft and hard) the next process starts with.
    nofile: Option<u64>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Short: Unix socket paths must stay under ~100 bytes.
        let dir = std::env::temp_dir().join(format!("p2p-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("lab directory");
        Lab {
            dir,
            server: None,
            procs: Vec::new(),
            nofile: None,
        }
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) {
        self.spawn_in(None, name, program, args)
    }

    /// Starts a process, inside network namespace `netns` if given.
    fn spawn_in(&mut self, netns: Option<&str>, name: &str, program: &Path, args: &[String]) {
        let log = self.dir.join(format!("{name}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child is the program.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        if let Some(n) = self.nofile.take() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, which is async-signal-safe, runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("P2P_LAB_LOG").unwrap_or_else(|_| "info,proto=debug".into()),
            )
            .env_remove("P2PD_SOCKET")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.procs.retain(|p| p.name != name);
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
    }

    /// Starts the rendezvous server on `addr` (port 0 on first start) and
    /// waits for its banner to learn the address.
    pub fn start_rendezvous(&mut self) {
        self.start_rendezvous_in(None, &[]);
    }

    /// Starts the rendezvous server inside `netns` (if given), with extra
    /// arguments.
    pub fn start_rendezvous_in(&mut self, netns: Option<&str>, extra: &[&str]) {
        let listen = self.server.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let log = self.dir.join("rendezvous.log");
        let before = fs::read_to_string(&log).map(|s| s.len()).unwrap_or(0);
        let mut args = vec![
            "--listen".into(),
            listen,
            "--data-dir".into(),
            self.dir.join("rendezvous").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_in(netns, "rendezvous", &bin("rendezvous"), &args);
        let addr = self.wait_for("rendezvous banner", Duration::from_secs(20), |lab| {
            let text = fs::read_to_string(&log).unwrap_or_default();
            text.get(before..)
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.split("listening on ").nth(1))
                        .map(|rest| rest.split(',').next().unwrap_or("").to_owned())
                })
                .filter(|_| lab.running("rendezvous"))
        });
        self.server = Some(addr);
    }

    /// A rendezvous and two daemons, "a" registered as alice and "b" as
    /// bob, connected (alice asked, bob accepted).
    pub fn connected_pair(tag: &str) -> Lab {
        Self::connected_pair_limited(tag, None)
    }

    /// As [`Lab::connected_pair`], both daemons under an open-file limit
    /// of `nofile` if given.
    pub fn connected_pair_limited(tag: &str, nofile: Option<u64>) -> Lab {
        let mut lab = Lab::new(tag);
        lab.start_rendezvous();
        for name in ["a", "b"] {
            match nofile {
                Some(n) => lab.start_daemon_with_nofile(name, n),
                None => lab.start_daemon(name),
            }
        }
        lab.ctl("a", &["register", "alice"]).ok();
        lab.ctl("b", &["register", "bob"]).ok();
        let socket = lab.socket("a");
        let connect = std::thread::spawn(move || p2pctl(&socket, &["connect", "bob"], None));
        lab.wait_for("alice's request at bob", Duration::from_secs(30), |lab| {
            let peers = lab.ctl("b", &["--json", "peers"]).json();
            (peers["requests"][0]["name"] == "alice").then_some(())
        });
        lab.ctl("b", &["accept", "alice"]).ok();
        connect.join().unwrap().ok();
        lab
    }

    /// Waits until daemons `a` and `b` (each registered under its own
    /// name) are logged in, then `a` connects to `b` and `b` accepts.
    pub fn log_in_and_connect(&mut self, a: &str, b: &str, limit: Duration) {
        self.wait_for("logins", limit, |lab| {
            let up = |n| lab.ctl(n, &["--json", "whoami"]).json()["server_state"] == "logged_in";
            (up(a) && up(b)).then_some(())
        });
        let socket = self.socket(a);
        let peer = b.to_owned();
        let connect = std::thread::spawn(move || p2pctl(&socket, &["connect", &peer], None));
        self.wait_for("the request", limit, |lab| {
            lab.ctl(b, &["--json", "peers"]).json()["requests"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
                .then_some(())
        });
        self.ctl(b, &["accept", a]).ok();
        connect.join().expect("connect").ok();
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Starts a daemon called `name` (its data dir and socket are named
    /// after it) and waits until its control socket answers.
    pub fn start_daemon(&mut self, name: &str) {
        self.start_daemon_in(None, name, &["--listen", "127.0.0.1:0"]);
    }

    /// Starts a daemon whose open-file limit, soft and hard, is `nofile`.
    pub fn start_daemon_with_nofile(&mut self, name: &str, nofile: u64) {
        self.nofile = Some(nofile);
        self.start_daemon(name);
    }

    /// Starts a daemon inside `netns` (if given), with extra arguments.
    pub fn start_daemon_in(&mut self, netns: Option<&str>, name: &str, extra: &[&str]) {
        let server = self.server.clone().expect("rendezvous started first");
        let mut args = vec![
            "--server".into(),
            server,
            "--data-dir".into(),
            self.dir.join(name).display().to_string(),
            "--socket".into(),
            self.socket(name).display().to_string(),
        ];
        if !extra.contains(&"--heartbeat") {
            // Fast heartbeats: a restarted server is noticed in seconds.
            args.extend(["--heartbeat".into(), "1".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_in(netns, name, &bin("p2pd"), &args);
        self.wait_for("daemon control socket", Duration::from_secs(20), |lab| {
            (lab.ctl(name, &["whoami"]).code == 0).then_some(())
        });
    }

    pub fn running(&mut self, name: &str) -> bool {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// Stops a process with SIGTERM, as systemd would, and waits for it.
    pub fn stop(&mut self, name: &str) -> i32 {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let _ = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = p.child.kill();
                panic!("{name} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of `name`.
    pub fn pid(&self, name: &str) -> u32 {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .child
            .id()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to a process.
    pub fn signal(&self, name: &str, signal: &str) {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &p.child.id().to_string()])
            .status();
    }

    /// Kills a process with SIGKILL (a crash: no cleanup runs).
    pub fn kill(&mut self, name: &str) {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Runs `p2pctl --socket <name's socket> args...`.
    pub fn ctl(&self, name: &str, args: &[&str]) -> Output {
        self.ctl_stdin(name, args, None)
    }

    pub fn ctl_stdin(&self, name: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        p2pctl(&self.socket(name), args, stdin)
    }

    /// Starts `p2pctl --json watch` for `name`, its output going to a file
    /// read by [`Lab::watched`].
    pub fn watch(&mut self, name: &str) {
        let args = vec![
            "--socket".into(),
            self.socket(name).display().to_string(),
            "--json".into(),
            "watch".into(),
        ];
        let log = self.dir.join(format!("{name}.log"));
        let count = || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("CONTROL(WATCH)")
                .count()
        };
        let before = count();
        self.spawn(&format!("watch-{name}"), &bin("p2pctl"), &args);
        // Events before the subscription are not replayed: wait for it.
        self.wait_for("the watcher to subscribe", Duration::from_secs(20), |_| {
            (count() > before).then_some(())
        });
    }

    /// The events a watcher printed so far.
    pub fn watched(&self, name: &str) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join(format!("watch-{name}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls `f` every 50 ms until it gives a value; fails the test with
    /// every log after `limit`. (A wait with a generous limit, not a
    /// timing assertion.)
    #[track_caller]
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&mut Lab) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("waited {limit:?} for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            s.push_str(&format!("----- {} ({}) -----\n", p.name, p.log.display()));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

/// The longest one p2pctl command may take in a test.
pub const P2PCTL_LIMIT: Duration = Duration::from_secs(180);

/// Runs `p2pctl --socket SOCKET args...`, feeding `stdin` if given. Needs
/// no lab, so a test can run it from another thread.
pub fn p2pctl(socket: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(bin("p2pctl"));
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("P2PD_SOCKET")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start p2pctl");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let bytes = bytes.to_vec();
        // Write from a thread: p2pctl may answer before reading all.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    // A command that should end but hangs (a follow waiting for an event
    // that never comes) fails its test instead of stalling the suite.
    let (ended, watchdog) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(P2PCTL_LIMIT).is_err() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    });
    let out = child.wait_with_output().expect("p2pctl output");
    let _ = ended.send(());
    assert!(
        out.status.code().is_some(),
        "p2pctl {args:?} killed after {P2PCTL_LIMIT:?}: it hung"
    );
    Output {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            eprintln!("lab kept at {}", self.dir.display());
        } else if std::env::var_os("P2P_KEEP_LAB").is_some() {
            eprintln!("lab kept at {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Test file contents: `len` bytes from a xorshift generator seeded with
/// `seed` (not compressible, the same every run).
pub fn content(seed: u64, len: usize) -> Vec<u8> {
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

/// The transfers daemon `who` has, as `p2pctl --json transfers` shows them.
pub fn transfers(lab: &Lab, who: &str) -> Vec<serde_json::Value> {
    lab.ctl(who, &["--json", "transfers"])
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A small file system mounted for a test (tmpfs, needs root), unmounted
/// when dropped.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`8m`) at `dir` (made if need be); None,
    /// saying so, when not root. Panics if the mount fails as root.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let root = Command::new("id").arg("-u").output();
        if !root.is_ok_and(|o| o.stdout.trim_ascii() == b"0") {
            eprintln!("SKIPPED: mounting a small filesystem needs root");
            return None;
        }
        fs::create_dir_all(dir).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "cannot mount a tmpfs at {}", dir.display());
        Some(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the lab's daemons (dropped after this guard) may still
        // hold files there.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
