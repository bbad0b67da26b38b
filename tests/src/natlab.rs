//! A NAT lab: Linux network namespaces joined by veth pairs, with routers
//! made of nftables rules, so NAT traversal is tested against the kernel's
//! real connection tracking rather than a model of it.
//!
//! ```text
//!   public (203.0.113.0/24, 2001:db8::/64, bridge br0; the rendezvous runs here)
//!     │ wan 203.0.113.1x              │
//!   router r1 (nftables)            router r2 ...
//!     │ lan 192.168.1.1/24            │ (a router may also sit behind another
//!   host a 192.168.1.2, host a2 ...   │  router: carrier-grade NAT, 100.64.x.0/24)
//! ```
//!
//! Every namespace name starts with a prefix unique to this process and
//! lab, so parallel runs never collide, and every namespace is deleted when
//! the [`Net`] is dropped. Traffic never leaves the lab: the public segment
//! is a bridge inside a namespace of its own, with no link to the host.
//!
//! Routers model what real ones do (see [`Nat`]): masquerade on the WAN
//! side, and a stateful firewall that drops unsolicited inbound packets
//! (`ct state new` on the WAN side, for both input and forward). Without
//! that rule Linux conntrack would record a peer's first punch packet to
//! the router itself, and masquerade would then give the host's own
//! outgoing flow a different port: a failure no real home router shows.
//!
//! IPv6 runs beside IPv4 with no NAT at all: each LAN has its own /64,
//! routed by the public namespace, behind the same stateful firewall.
//!
//! The lab needs root, `ip` (iproute2) and `nft` (nftables). Where it can't
//! run, [`Net::new`] prints why and returns `None` so the test can skip;
//! with `P2P_REQUIRE_NATLAB=1` (set by `.ci/run`) that is a failure instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The kinds of router the lab builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// A typical home router: endpoint-independent mapping (masquerade
    /// keeps a host's source port for every destination), port-restricted
    /// filtering through the stateful firewall.
    Home,
    /// Endpoint-dependent mapping (`masquerade random`): every destination
    /// gets a new random port, which defeats plain hole punching.
    Symmetric,
    /// A home router on a network that drops all UDP but DNS.
    UdpBlocked,
}

/// A router: a namespace with a WAN and a LAN interface.
#[derive(Debug, Clone)]
pub struct Router {
    pub ns: String,
    pub nat: Nat,
    /// The WAN address: what the rest of the world sees of its hosts.
    pub wan: Ipv4Addr,
    /// The router's index: its LAN is 192.168.<index>.0/24 (100.64.<index>.0/24
    /// when it is a carrier-grade NAT, see [`Net::cgnat`]) and
    /// 2001:db8:<index>::/64.
    index: u8,
    lan_v4: [u8; 3],
}

/// A host on a router's LAN.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
    /// Link emulators between impaired routers and the public segment.
    links: Vec<std::process::Child>,
    next_router: u8,
    next_host: Vec<(String, u8)>,
    /// The namespace of the public segment (and of the rendezvous server).
    pub public: String,
}

/// The rendezvous server's addresses on the public segment.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the lab can't run here, if it can't.
fn unavailable() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("the NAT lab needs Linux network namespaces".into());
    }
    let uid = Command::new("id").arg("-u").output();
    if !uid.is_ok_and(|o| o.stdout.trim_ascii() == b"0") {
        return Some("the NAT lab needs root".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "the NAT lab needs `{tool}` (install iproute2 and nftables)"
            ));
        }
    }
    None
}

/// Runs a command and panics, with its output, if it fails.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip -n NS args...`.
#[track_caller]
fn ip(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    sh(&v);
}

/// Runs a command inside a namespace.
#[track_caller]
pub fn exec(ns: &str, args: &[&str]) -> String {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

#[track_caller]
fn sysctl(ns: &str, setting: &str) {
    exec(ns, &["sysctl", "-q", "-w", setting]);
}

#[track_caller]
fn nft(ns: &str, ruleset: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("nft stdin")
        .write_all(ruleset.as_bytes())
        .expect("write ruleset");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft in {ns} refused:\n{ruleset}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// Builds the public segment, or says why the lab can't run here.
    pub fn new(tag: &str) -> Option<Net> {
        if let Some(why) = unavailable() {
            if std::env::var("P2P_REQUIRE_NATLAB").as_deref() == Ok("1") {
                panic!("P2P_REQUIRE_NATLAB=1 but {why}");
            }
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("p2p{}{}{tag}", std::process::id(), n);
        let public = format!("{prefix}-pub");
        let mut net = Net {
            prefix,
            namespaces: Vec::new(),
            links: Vec::new(),
            next_router: 1,
            next_host: Vec::new(),
            public: public.clone(),
        };
        net.namespace(&public);
        ip(&public, &["link", "add", "br0", "type", "bridge"]);
        ip(&public, &["link", "set", "br0", "up"]);
        ip(&public, &["addr", "add", "203.0.113.1/24", "dev", "br0"]);
        ip(
            &public,
            &["-6", "addr", "add", "2001:db8::1/64", "dev", "br0", "nodad"],
        );
        sysctl(&public, "net.ipv6.conf.all.forwarding=1");
        // It routes between the segment and impaired routers' links.
        sysctl(&public, "net.ipv4.ip_forward=1");
        Some(net)
    }

    fn namespace(&mut self, name: &str) {
        sh(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_owned());
        // No duplicate address detection: it holds new IPv6 addresses
        // (link-local ones too, which neighbour discovery needs) for
        // seconds, and nothing in the lab can collide.
        sysctl(name, "net.ipv6.conf.all.accept_dad=0");
        sysctl(name, "net.ipv6.conf.default.accept_dad=0");
        ip(name, &["link", "set", "lo", "up"]);
    }

    /// A router on the public segment.
    pub fn router(&mut self, nat: Nat) -> Router {
        let index = self.next_router;
        self.next_router += 1;
        let ns = format!("{}-r{index}", self.prefix);
        self.namespace(&ns);
        let wan = Ipv4Addr::new(203, 0, 113, 10 + index);
        let uplink = format!("r{index}");
        sh(&[
            "ip",
            "link",
            "add",
            "wan",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &uplink,
            "netns",
            &self.public,
        ]);
        ip(
            &self.public,
            &["link", "set", &uplink, "master", "br0", "up"],
        );
        ip(&ns, &["addr", "add", &format!("{wan}/24"), "dev", "wan"]);
        let wan6 = format!("2001:db8::{:x}", 0x10 + index as u16);
        ip(
            &ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{wan6}/64"),
                "dev",
                "wan",
                "nodad",
            ],
        );
        ip(&ns, &["link", "set", "wan", "up"]);
        ip(&ns, &["route", "add", "default", "via", "203.0.113.1"]);
        ip(
            &ns,
            &["-6", "route", "add", "default", "via", "2001:db8::1"],
        );
        // The public segment routes each LAN's IPv6 prefix to its router.
        ip(
            &self.public,
            &[
                "-6",
                "route",
                "add",
                &format!("2001:db8:{index:x}::/64"),
                "via",
                &wan6,
            ],
        );
        let router = Router {
            ns,
            nat,
            wan,
            index,
            lan_v4: [192, 168, index],
        };
        self.lan(&router);
        router
    }

    /// A router whose WAN link to the public segment goes through
    /// `linkem` (the project's link emulator: these kernels have no
    /// `netem`), impaired with `impair`, e.g. `["--delay-ms", "25",
    /// "--loss-pct", "1"]`, in each direction. Its WAN address is
    /// 198.51.100.<index>, routed by the public namespace.
    pub fn router_via_link(&mut self, nat: Nat, impair: &[&str]) -> Router {
        use std::io::BufRead;
        let index = self.next_router;
        self.next_router += 1;
        let ns = format!("{}-r{index}", self.prefix);
        self.namespace(&ns);
        let uplink = format!("r{index}");
        let mut child = Command::new(crate::bin("linkem"))
            .arg("--a")
            .arg(format!("{}:{uplink}", self.public))
            .arg("--b")
            .arg(format!("{ns}:wan"))
            .args(["--seed", &index.to_string()])
            .args(impair)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start linkem");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("linkem stdout");
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        assert_eq!(line.trim(), "linkem: ready", "linkem did not start");
        self.links.push(child);
        let wan = Ipv4Addr::new(198, 51, 100, index);
        let wan6 = format!("2001:db8:ffff::{index:x}");
        ip(&self.public, &["link", "set", &uplink, "up"]);
        ip(
            &self.public,
            &["route", "add", &format!("{wan}/32"), "dev", &uplink],
        );
        ip(
            &self.public,
            &["-6", "route", "add", &format!("{wan6}/128"), "dev", &uplink],
        );
        ip(
            &self.public,
            &[
                "-6",
                "route",
                "add",
                &format!("2001:db8:{index:x}::/64"),
                "dev",
                &uplink,
            ],
        );
        ip(&ns, &["addr", "add", &format!("{wan}/32"), "dev", "wan"]);
        ip(
            &ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{wan6}/128"),
                "dev",
                "wan",
                "nodad",
            ],
        );
        ip(&ns, &["link", "set", "wan", "up"]);
        ip(&ns, &["route", "add", "default", "dev", "wan"]);
        ip(&ns, &["-6", "route", "add", "default", "dev", "wan"]);
        let router = Router {
            ns,
            nat,
            wan,
            index,
            lan_v4: [192, 168, index],
        };
        self.lan(&router);
        router
    }

    /// A carrier-grade NAT on the public segment whose LAN
    /// (100.64.<index>.0/24) is the WAN of the routers made with
    /// [`Net::router_behind`]. It is an endpoint-independent NAT, as
    /// RFC 6888 asks of one.
    pub fn cgnat(&mut self) -> Router {
        let mut r = self.router(Nat::Home);
        // Rebuild its LAN as 100.64.<index>.0/24.
        ip(&r.ns, &["addr", "flush", "dev", "lan"]);
        r.lan_v4 = [100, 64, r.index];
        ip(
            &r.ns,
            &[
                "addr",
                "add",
                &format!("100.64.{}.1/24", r.index),
                "dev",
                "lan",
            ],
        );
        ip(
            &r.ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:{:x}::1/64", r.index),
                "dev",
                "lan",
                "nodad",
            ],
        );
        r
    }

    /// A home router whose WAN is on the LAN of `upstream` (double NAT).
    pub fn router_behind(&mut self, upstream: &Router, nat: Nat) -> Router {
        let index = self.next_router;
        self.next_router += 1;
        let ns = format!("{}-r{index}", self.prefix);
        self.namespace(&ns);
        let wan = self.attach(upstream, &ns, "wan");
        ip(&ns, &["link", "set", "wan", "up"]);
        let gw = Ipv4Addr::new(
            upstream.lan_v4[0],
            upstream.lan_v4[1],
            upstream.lan_v4[2],
            1,
        );
        ip(&ns, &["route", "add", "default", "via", &gw.to_string()]);
        let router = Router {
            ns,
            nat,
            wan: wan.0,
            index,
            lan_v4: [192, 168, index],
        };
        self.lan(&router);
        router
    }

    /// The router's LAN bridge, its addresses and its nftables rules.
    fn lan(&mut self, r: &Router) {
        let ns = &r.ns;
        ip(ns, &["link", "add", "lan", "type", "bridge"]);
        ip(ns, &["link", "set", "lan", "up"]);
        let [a, b, c] = r.lan_v4;
        ip(
            ns,
            &["addr", "add", &format!("{a}.{b}.{c}.1/24"), "dev", "lan"],
        );
        ip(
            ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:{:x}::1/64", r.index),
                "dev",
                "lan",
                "nodad",
            ],
        );
        sysctl(ns, "net.ipv4.ip_forward=1");
        sysctl(ns, "net.ipv6.conf.all.forwarding=1");
        let masquerade = match r.nat {
            Nat::Symmetric => "masquerade random",
            Nat::Home | Nat::UdpBlocked => "masquerade",
        };
        let block_udp = match r.nat {
            Nat::UdpBlocked => "oifname \"wan\" udp dport != 53 drop",
            _ => "",
        };
        nft(
            ns,
            &format!(
                r#"
table ip nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    oifname "wan" {masquerade}
  }}
}}
table inet firewall {{
  chain forward {{
    type filter hook forward priority 0;
    {block_udp}
    iifname "wan" ct state new drop
  }}
  chain input {{
    type filter hook input priority 0;
    iifname "wan" ct state new drop
  }}
}}
"#
            ),
        );
        self.next_host.push((ns.clone(), 2));
    }

    /// Connects namespace `ns` to `router`'s LAN with an interface named
    /// `ifname`, and gives it the next free address there.
    fn attach(&mut self, router: &Router, ns: &str, ifname: &str) -> (Ipv4Addr, Ipv6Addr) {
        let slot = self
            .next_host
            .iter_mut()
            .find(|(r, _)| *r == router.ns)
            .expect("router of this lab");
        let n = slot.1;
        slot.1 += 1;
        let port = format!("h{n}");
        sh(&[
            "ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &port,
            "netns", &router.ns,
        ]);
        ip(&router.ns, &["link", "set", &port, "master", "lan", "up"]);
        let [a, b, c] = router.lan_v4;
        let v4 = Ipv4Addr::new(a, b, c, n);
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, router.index as u16, 0, 0, 0, 0, n as u16);
        ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", ifname]);
        ip(
            ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ],
        );
        (v4, v6)
    }

    /// A host on `router`'s LAN, with a default route through it.
    pub fn host(&mut self, router: &Router) -> Host {
        let ns = format!("{}-h{}", self.prefix, self.namespaces.len());
        self.namespace(&ns);
        let (v4, v6) = self.attach(router, &ns, "eth0");
        self.link_up(
            &Host {
                ns: ns.clone(),
                v4,
                v6,
            },
            router,
        );
        Host { ns, v4, v6 }
    }

    /// The host's network goes away: its link is set down (its routes go
    /// with it).
    pub fn link_down(&self, host: &Host) {
        ip(&host.ns, &["link", "set", "eth0", "down"]);
    }

    /// The host's link comes up, with its default routes through `router`
    /// (as a DHCP client would set them again).
    pub fn link_up(&self, host: &Host, router: &Router) {
        let ns = host.ns.as_str();
        ip(ns, &["link", "set", "eth0", "up"]);
        // IPv6 addresses do not survive a link going down (unlike IPv4's).
        let v6 = format!("{}/64", host.v6);
        ip(ns, &["-6", "addr", "replace", &v6, "dev", "eth0", "nodad"]);
        let [a, b, c] = router.lan_v4;
        let gw4 = format!("{a}.{b}.{c}.1");
        ip(ns, &["route", "replace", "default", "via", &gw4]);
        let gw6 = format!("2001:db8:{:x}::1", router.index);
        ip(ns, &["-6", "route", "replace", "default", "via", &gw6]);
    }

    /// Sets how long the router keeps an idle UDP mapping, for flows seen
    /// in one direction and in both (conntrack's two UDP timeouts).
    pub fn udp_timeout(&self, router: &Router, secs: u32) {
        sysctl(
            &router.ns,
            &format!("net.netfilter.nf_conntrack_udp_timeout={secs}"),
        );
        sysctl(
            &router.ns,
            &format!("net.netfilter.nf_conntrack_udp_timeout_stream={secs}"),
        );
    }

    /// The router forgets every mapping (a reboot, or a NAT that rebinds).
    pub fn flush_mappings(&self, router: &Router) {
        exec(&router.ns, &["conntrack", "-F"]);
    }

    /// The router rebinds: it forgets every mapping and maps flows to
    /// ports it did not use before (a new window of 1,000 ports at each
    /// call), so each host's public address changes.
    pub fn rebind(&self, router: &Router) {
        static WINDOW: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let w = WINDOW.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 40;
        let (lo, hi) = (20_000 + w * 1_000, 20_999 + w * 1_000);
        let random = if router.nat == Nat::Symmetric {
            " random"
        } else {
            ""
        };
        exec(
            &router.ns,
            &["nft", "flush", "chain", "ip", "nat", "postrouting"],
        );
        let udp = format!("oifname \"wan\" meta l4proto udp masquerade to :{lo}-{hi}{random}");
        let rest = format!("oifname \"wan\" masquerade{random}");
        for rule in [udp, rest] {
            let mut args = vec!["nft", "add", "rule", "ip", "nat", "postrouting"];
            args.extend(rule.split(' '));
            exec(&router.ns, &args);
        }
        exec(&router.ns, &["conntrack", "-F"]);
    }

    /// Makes `router` drop everything to and from `other`'s networks (a
    /// firewall between two peers), until [`Net::unblock`].
    pub fn block(&self, router: &Router, other: &Router) {
        let (v4, v6) = (other.wan, format!("2001:db8:{:x}::/64", other.index));
        nft(
            &router.ns,
            &format!(
                r#"
table inet block {{
  chain forward {{
    type filter hook forward priority -10;
    ip daddr {v4} drop
    ip saddr {v4} drop
    ip6 daddr {v6} drop
    ip6 saddr {v6} drop
  }}
}}
"#
            ),
        );
    }

    /// Lets UDP through a [`Nat::UdpBlocked`] router again (the user moved
    /// to a better network).
    pub fn allow_udp(&self, router: &Router) {
        exec(
            &router.ns,
            &["nft", "flush", "chain", "inet", "firewall", "forward"],
        );
        exec(
            &router.ns,
            &[
                "nft", "add", "rule", "inet", "firewall", "forward", "iifname", "wan", "ct",
                "state", "new", "drop",
            ],
        );
    }

    /// Makes `router` drop every UDP packet it would forward, flows under
    /// way included (a firewall rule added mid-session), until
    /// [`Net::unblock_udp`].
    pub fn block_udp(&self, router: &Router) {
        nft(
            &router.ns,
            r#"
table inet noudp {
  chain forward {
    type filter hook forward priority -10;
    meta l4proto udp drop
  }
}
"#,
        );
    }

    pub fn unblock_udp(&self, router: &Router) {
        exec(&router.ns, &["nft", "delete", "table", "inet", "noudp"]);
    }

    /// Makes `router` drop all IPv6 it would forward: its hosts have IPv4
    /// only.
    pub fn block_v6(&self, router: &Router) {
        nft(
            &router.ns,
            r#"
table ip6 nov6 {
  chain forward {
    type filter hook forward priority -10;
    drop
  }
}
"#,
        );
    }

    pub fn unblock(&self, router: &Router) {
        exec(&router.ns, &["nft", "delete", "table", "inet", "block"]);
    }

    /// Adds nftables rules to a router, e.g. random loss on its WAN.
    pub fn rules(&self, router: &Router, ruleset: &str) {
        nft(&router.ns, ruleset);
    }
}

impl Host {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.v6)
        } else {
            IpAddr::V4(self.v4)
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for link in &mut self.links {
            let _ = link.kill();
            let _ = link.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Every frame seen on the interfaces of a namespace, captured from a
/// thread that entered it (a raw `AF_PACKET` socket; no tcpdump needed).
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    pub fn start(ns: &str) -> Capture {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/var/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let fd = match enter_and_open(&path) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return frames;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                // SAFETY: fd is a socket we own; buf is valid for its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            // SAFETY: fd is ours and closed once.
            unsafe { libc::close(fd) };
            frames
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("cannot capture in {ns}: {e}"),
            Err(_) => panic!("capture thread for {ns} died"),
        }
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the frames captured.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Moves this thread into the namespace at `path` and opens a raw socket
/// for every frame there, with a short receive timeout so the owner can
/// stop it.
fn enter_and_open(path: &str) -> Result<i32, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on descriptors we own; setns only affects
    // this thread, which exists only to capture.
    unsafe {
        if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(fd)
    }
}
