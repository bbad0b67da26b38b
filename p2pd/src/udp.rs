//! The daemon's UDP socket, in batches: many datagrams per system call
//! where the kernel can (Linux: `recvmmsg` with UDP GRO to read, UDP GSO
//! to send a run of equal-sized datagrams to one address in one call),
//! one at a time where it cannot. `quinn-udp` does the system calls and
//! finds out what the kernel supports.
//!
//! Sending groups what [`Udp::send_all`] is given: consecutive datagrams
//! to the same address, all of one size but the last, which may be
//! shorter, go as one GSO send. Anything else goes alone.

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// A GSO send's bytes at most (one UDP send carries under 64 KiB).
const MAX_GSO_BYTES: usize = 65_000;
/// Datagrams read per `recvmmsg`.
const RECV_BATCH: usize = 16;

pub struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    /// Datagrams per GSO send at most (1: no GSO).
    max_segments: usize,
    /// Receive buffers, each large enough for a GRO batch of the largest
    /// datagrams.
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// A GSO run being gathered, and its datagrams' size.
    run: Vec<u8>,
    /// Counters: system calls and datagrams each way.
    pub stats: UdpStats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct UdpStats {
    pub send_calls: u64,
    pub sent: u64,
    pub recv_calls: u64,
    pub received: u64,
}

impl Udp {
    /// Takes `socket` over. `gso: false` sends one datagram per call (the
    /// fallback where the kernel has no GSO, and what tests compare with).
    pub fn new(socket: UdpSocket, gso: bool) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        let max_segments = if gso {
            state.max_gso_segments().max(1)
        } else {
            1
        };
        // One byte more than the largest datagram, so a larger one is
        // seen (and dropped as oversized) rather than cut to fit; and room
        // for a GRO batch of Ethernet-sized datagrams (the kernel joins up
        // to 64 KiB by default).
        let per_buf = (proto::wire::MAX_DATAGRAM + 1).max(1_500 * state.gro_segments());
        Ok(Udp {
            socket,
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; per_buf]).collect(),
            meta: vec![RecvMeta::default(); RECV_BATCH],
            state,
            max_segments,
            run: Vec::new(),
            stats: UdpStats::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Datagrams per send call at most.
    pub fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// Waits until there is something to read.
    pub async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Reads what is waiting (one `recvmmsg`), giving each datagram and
    /// its source to `f`. Returns how many datagrams and bytes; none when
    /// nothing was waiting.
    pub fn try_recv(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> (usize, usize) {
        let Udp {
            socket,
            state,
            bufs,
            meta,
            ..
        } = self;
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let got = socket.try_io(Interest::READABLE, || {
            state.recv((&*socket).into(), &mut slices, meta)
        });
        self.stats.recv_calls += 1;
        let n = match got {
            Ok(n) => n,
            // Nothing waiting, or an error an unconnected socket can still
            // report (ICMP): either way, nothing to read now.
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "UDP(RECV_ERROR)");
                }
                return (0, 0);
            }
        };
        let mut datagrams = 0;
        let mut bytes = 0;
        for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
            bytes += m.len;
            // A GRO read holds datagrams of `stride` bytes (the last may
            // be shorter), all from one source.
            let stride = m.stride.max(1);
            for d in buf[..m.len].chunks(stride) {
                f(m.addr, d);
                datagrams += 1;
            }
        }
        self.stats.received += datagrams as u64;
        (datagrams, bytes)
    }

    /// Sends `datagrams` in order, as few system calls as the kernel
    /// allows. A datagram that cannot be sent is logged and dropped (the
    /// protocol sends again what matters).
    pub async fn send_all(&mut self, datagrams: &[(SocketAddr, Vec<u8>)]) {
        let mut i = 0;
        while i < datagrams.len() {
            let (dst, first) = &datagrams[i];
            let size = first.len();
            // The run: same address, same size, but the last may be
            // shorter; at most `max_segments`.
            // (What the kernel takes can drop to one at run time: quinn-udp
            // turns GSO off after an error it blames on it.)
            let max_segments = self.max_segments.min(self.state.max_gso_segments().max(1));
            let mut end = i + 1;
            while end < datagrams.len()
                && end - i < max_segments
                && (end - i + 1) * size <= MAX_GSO_BYTES
                && datagrams[end].0 == *dst
                && datagrams[end - 1].1.len() == size
                && datagrams[end].1.len() <= size
                && !datagrams[end].1.is_empty()
            {
                end += 1;
            }
            let contents: &[u8] = if end - i == 1 {
                first
            } else {
                self.run.clear();
                for (_, d) in &datagrams[i..end] {
                    self.run.extend_from_slice(d);
                }
                &self.run
            };
            let transmit = Transmit {
                destination: *dst,
                ecn: None,
                contents,
                segment_size: (end - i > 1).then_some(size),
                src_ip: None,
            };
            let (socket, state) = (&self.socket, &self.state);
            let sent = socket
                .async_io(Interest::WRITABLE, || {
                    state.try_send(socket.into(), &transmit)
                })
                .await;
            self.stats.send_calls += 1;
            match sent {
                Ok(()) => self.stats.sent += (end - i) as u64,
                // A run refused as a whole (a device without segmentation
                // offload, a probe too large for the path leading it):
                // each datagram goes alone, and only those the path
                // refuses are lost.
                Err(e) if end - i > 1 => {
                    tracing::debug!(dst = %dst, error = %e, segments = end - i, "UDP(GSO_SEND_ERROR)");
                    for (dst, d) in &datagrams[i..end] {
                        let one = Transmit {
                            destination: *dst,
                            ecn: None,
                            contents: d,
                            segment_size: None,
                            src_ip: None,
                        };
                        let (socket, state) = (&self.socket, &self.state);
                        let r = socket
                            .async_io(Interest::WRITABLE, || state.try_send(socket.into(), &one))
                            .await;
                        self.stats.send_calls += 1;
                        match r {
                            Ok(()) => self.stats.sent += 1,
                            Err(e) => tracing::debug!(dst = %dst, error = %e, "UDP(SEND_ERROR)"),
                        }
                    }
                }
                Err(e) => tracing::debug!(dst = %dst, error = %e, "UDP(SEND_ERROR)"),
            }
            i = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `receiver` reads until it has `n` datagrams.
    async fn read(receiver: &mut Udp, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < n {
            tokio::time::timeout(std::time::Duration::from_secs(5), receiver.readable())
                .await
                .expect("datagrams in time")
                .unwrap();
            let _ = receiver.try_recv(|_, d| got.push(d.to_vec()));
        }
        got
    }

    #[tokio::test]
    async fn batches_and_single_sends_carry_the_same_datagrams() {
        // Runs of full-size datagrams with a shorter last one, sizes that
        // change, and another destination in between: with GSO (where the
        // kernel has it) and without, the receiver reads the same
        // datagrams in the same order.
        for gso in [true, false] {
            let bind = || async {
                let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                Udp::new(s, gso).unwrap()
            };
            let (mut tx, mut rx, mut other) = (bind().await, bind().await, bind().await);
            let (to, elsewhere) = (rx.local_addr().unwrap(), other.local_addr().unwrap());
            let mut datagrams = Vec::new();
            for i in 0..40u8 {
                let len = match i % 10 {
                    9 => 300,
                    _ => 1200,
                };
                datagrams.push((to, vec![i; len]));
                if i == 25 {
                    datagrams.push((elsewhere, vec![0xee; 50]));
                }
            }
            tx.send_all(&datagrams).await;
            let expect: Vec<Vec<u8>> = datagrams
                .iter()
                .filter(|(d, _)| *d == to)
                .map(|(_, b)| b.clone())
                .collect();
            assert_eq!(read(&mut rx, expect.len()).await, expect, "gso {gso}");
            assert_eq!(read(&mut other, 1).await, vec![vec![0xee; 50]]);
            let calls = tx.stats.send_calls;
            if tx.max_segments() > 1 {
                assert!(calls < 20, "{calls} send calls for 41 datagrams");
            } else {
                assert_eq!(calls, 41);
            }
        }
    }
}
