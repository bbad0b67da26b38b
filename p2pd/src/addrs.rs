//! Our own addresses: the candidates offered to peers for a direct path,
//! and the translation between a dual-stack socket's addresses and the
//! plain IPv4/IPv6 addresses the protocol machines use.
//!
//! The daemon binds `[::]:port` by default: one socket for both families
//! (IPv4 arrives as v4-mapped IPv6, `::ffff:a.b.c.d`). The machines only
//! ever see canonical addresses, so a peer's IPv4 address compares equal
//! whichever way it arrived.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A received address as the machines want it: v4-mapped becomes IPv4.
pub use proto::canonical;

/// A destination as the socket wants it: an IPv6 socket sends to IPv4
/// through its v4-mapped form.
pub fn for_socket(dst: SocketAddr, socket_v6: bool) -> SocketAddr {
    match dst {
        SocketAddr::V4(v4) if socket_v6 => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        other => other,
    }
}

/// A non-blocking UDP socket on `[::]:port` that takes IPv4 too
/// (IPV6_V6ONLY cleared, whatever the system's default).
pub fn bind_dual(port: u16) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
    s.set_only_v6(false)?;
    grow_buffers(&s);
    let addr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Socket buffers asked for: a burst of file data at a few hundred MB/s
/// (a millisecond of pacing, plus acknowledgement aggregation) must not
/// overflow the default ~200 KiB. The kernel caps it at
/// `net.core.rmem_max`/`wmem_max`; a smaller buffer only costs speed.
const SOCKET_BUFFER: usize = 4 << 20;

/// Large buffers, and datagrams that leave whole or not at all.
fn grow_buffers(s: &socket2::Socket) {
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    no_fragments(s);
}

/// The system must neither fragment our datagrams nor shrink them to a
/// size an ICMP message claims: path MTU discovery (`proto::flow::pmtud`)
/// learns what the path carries from acknowledged probes, and a probe
/// that arrived in fragments would prove nothing. Linux: DF set, the
/// kernel's path MTU cache ignored (IP_PMTUDISC_PROBE), for IPv4 and, on
/// an IPv6 socket, for IPv6 as well. macOS: DF on IPv4.
fn no_fragments(s: &socket2::Socket) {
    use std::os::fd::AsRawFd;
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket and a c_int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!(error = %e, "UDP(NO_DF)");
        }
    };
    let v6 = s.domain().is_ok_and(|d| d == socket2::Domain::IPV6);
    #[cfg(target_os = "linux")]
    {
        set(
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        );
        if v6 {
            set(
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            );
        }
    }
    #[cfg(target_vendor = "apple")]
    if !v6 {
        set(libc::IPPROTO_IP, libc::IP_DONTFRAG, 1);
    }
    #[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
    let _ = (set, v6);
}

/// A non-blocking UDP socket on `addr` (any family), with large buffers.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    grow_buffers(&s);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Most candidates offered ([`proto::wire::MAX_ENDPOINTS`]).
const MAX: usize = proto::wire::MAX_ENDPOINTS;

/// Our local endpoints to offer a peer: the IPv4 address the system would
/// use to reach the server (a peer on the same LAN reaches us there), and
/// on a dual-stack socket every global IPv6 address of our interfaces
/// (IPv6 needs no NAT, only a firewall that punching opens).
pub fn local_candidates(bound: SocketAddr, server: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![canonical(bound)];
    }
    let port = bound.port();
    let mut out = Vec::new();
    let probe = std::net::UdpSocket::bind(("0.0.0.0", 0)).and_then(|s| {
        s.connect(server)?;
        s.local_addr()
    });
    if let Ok(a) = probe {
        out.push(SocketAddr::new(a.ip(), port));
    }
    if bound.is_ipv6() {
        for ip in interface_v6() {
            if out.len() < MAX {
                out.push(SocketAddr::new(IpAddr::V6(ip), port));
            }
        }
    }
    out
}

/// IPv6 addresses worth offering: global unicast and unique-local (a LAN
/// peer may share a ULA prefix), not loopback, link-local, multicast,
/// unspecified or v4-mapped.
fn is_global_v6(ip: &Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xffc0) == 0xfe80
        || ip.to_ipv4_mapped().is_some())
}

/// The IPv6 addresses of this host's interfaces (getifaddrs(3)).
fn interface_v6() -> Vec<Ipv6Addr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; every
    // pointer is checked for null and sockaddr_in6 is read only when the
    // family says it is one.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET6 {
                let sin6 = &*(addr as *const libc::sockaddr_in6);
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                if is_global_v6(&ip) && !out.contains(&ip) {
                    out.push(ip);
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_round_trip() {
        let v4: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        let mapped = for_socket(v4, true);
        assert_eq!(mapped.to_string(), "[::ffff:192.0.2.1]:7000");
        assert_eq!(canonical(mapped), v4);
        assert_eq!(for_socket(v4, false), v4);
        let v6: SocketAddr = "[2001:db8::1]:7000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
        assert_eq!(for_socket(v6, true), v6);
    }

    #[test]
    fn only_global_v6_is_offered() {
        for (ip, global) in [
            ("2001:db8::1", true),
            ("fd00::1", true),
            ("::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("::ffff:192.0.2.1", false),
        ] {
            assert_eq!(is_global_v6(&ip.parse().unwrap()), global, "{ip}");
        }
    }
}
