//! Length-checked reading and writing of wire bytes.
//!
//! Every read checks the remaining length first and returns
//! [`DecodeError`] instead of panicking; this is the only way decoders in
//! this crate touch untrusted bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("packet is {len} bytes, larger than the {max} allowed")]
    Oversized { len: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown packet type 0x{0:02x}")]
    UnknownType(u8),
    #[error("invalid value for {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

/// Reads values from a byte slice, checking lengths first.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("bool")),
        }
    }

    /// A byte string with a u16 length prefix, at most `max` bytes.
    pub fn bytes16(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(DecodeError::Oversized { len, max });
        }
        self.bytes(len)
    }

    /// A UTF-8 string with a u16 length prefix, at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let raw = self.bytes16(max)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid("utf-8 string"))
    }

    pub fn socket_addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(DecodeError::Invalid("address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    /// A list with a u8 count of at most `max` items.
    pub fn list<T>(
        &mut self,
        max: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.u8()? as usize;
        if n > max {
            return Err(DecodeError::Oversized { len: n, max });
        }
        (0..n).map(|_| item(self)).collect()
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends values to a byte vector.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A byte string with a u16 length prefix. Callers keep `v` under the
    /// limits the decoder enforces; longer input is cut at `u16::MAX`.
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        let v = &v[..v.len().min(u16::MAX as usize)];
        self.u16(v.len() as u16).bytes(v)
    }

    pub fn string(&mut self, v: &str) -> &mut Self {
        self.bytes16(v.as_bytes())
    }

    pub fn socket_addr(&mut self, a: &SocketAddr) -> &mut Self {
        match a.ip() {
            IpAddr::V4(ip) => self.u8(4).bytes(&ip.octets()),
            IpAddr::V6(ip) => self.u8(6).bytes(&ip.octets()),
        };
        self.u16(a.port())
    }

    pub fn list<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) -> &mut Self {
        let n = items.len().min(u8::MAX as usize);
        self.u8(n as u8);
        for it in &items[..n] {
            item(self, it);
        }
        self
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_length_checked() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert_eq!(r.u32(), Err(DecodeError::Truncated { needed: 3 }));
        // A failed read consumes nothing.
        assert_eq!(r.u8().unwrap(), 3);
        assert!(r.finish().is_ok());
    }

    #[test]
    fn string_limits_and_utf8() {
        let mut w = Writer::new();
        w.string("héllo");
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.string(64).unwrap(), "héllo");
        let mut r = Reader::new(&w.buf);
        assert!(matches!(r.string(3), Err(DecodeError::Oversized { .. })));
        let mut r = Reader::new(&[0, 2, 0xff, 0xfe]);
        assert_eq!(r.string(64), Err(DecodeError::Invalid("utf-8 string")));
    }

    #[test]
    fn socket_addrs_round_trip() {
        for a in ["1.2.3.4:5", "[::1]:65535"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut w = Writer::new();
            w.socket_addr(&a);
            assert_eq!(Reader::new(&w.buf).socket_addr().unwrap(), a);
        }
        assert!(Reader::new(&[5, 0, 0]).socket_addr().is_err());
    }
}
