//! Watches the host's network: on Linux an rtnetlink socket subscribed to
//! links and addresses coming and going (a cable, Wi-Fi, a VPN, a
//! namespace's link set down and up). Each change wakes the daemon, which
//! tells the node (`Node::handle_network_change`): what waited for the
//! network is tried again at once instead of at the end of its backoff.
//! Elsewhere (macOS) nothing is watched and the backoffs decide.

use std::io;

#[cfg(target_os = "linux")]
mod imp {
    use super::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    pub struct NetWatch {
        fd: AsyncFd<OwnedFd>,
    }

    impl NetWatch {
        pub fn new() -> io::Result<Self> {
            // SAFETY: plain socket(2); the result is checked before use and
            // owned by the OwnedFd from then on.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    libc::NETLINK_ROUTE,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a zeroed sockaddr_nl is valid; the fields set below
            // are the ones bind(2) reads.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            sa.nl_groups = (libc::RTMGRP_LINK
                | libc::RTMGRP_IPV4_IFADDR
                | libc::RTMGRP_IPV6_IFADDR
                | libc::RTMGRP_IPV4_ROUTE
                | libc::RTMGRP_IPV6_ROUTE) as u32;
            // SAFETY: `sa` lives across the call and its size is passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is an owned, valid, non-blocking descriptor that
            // is neither closed nor replaced while the AsyncFd holds it.
            let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
            Ok(Self { fd })
        }

        /// Waits for a change; several messages at once count as one.
        pub async fn changed(&self) -> io::Result<()> {
            let mut buf = [0u8; 8192];
            loop {
                let mut guard = self.fd.readable().await?;
                let mut got = false;
                loop {
                    // SAFETY: recv(2) into a buffer we own, its length given.
                    let n = unsafe {
                        libc::recv(
                            self.fd.get_ref().as_raw_fd(),
                            buf.as_mut_ptr() as *mut libc::c_void,
                            buf.len(),
                            0,
                        )
                    };
                    if n > 0 {
                        got = true;
                        continue;
                    }
                    let e = io::Error::last_os_error();
                    if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
                        guard.clear_ready();
                        break;
                    }
                    if n < 0 && e.raw_os_error() == Some(libc::ENOBUFS) {
                        // Messages were dropped: something changed.
                        got = true;
                        continue;
                    }
                    return Err(e);
                }
                if got {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::io;

    pub struct NetWatch;

    impl NetWatch {
        pub fn new() -> io::Result<Self> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "network changes are watched on Linux only",
            ))
        }

        pub async fn changed(&self) -> io::Result<()> {
            std::future::pending().await
        }
    }
}

pub use imp::NetWatch;

/// Waits for the next change, or forever without a watch.
pub async fn next_change(w: Option<&NetWatch>) {
    match w {
        Some(w) => {
            if w.changed().await.is_err() {
                // A broken watch must not spin the loop: no more changes.
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}
