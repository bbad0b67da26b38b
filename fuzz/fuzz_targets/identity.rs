//! Handshake payloads: a public identity (and what follows it: a reset
//! token from a peer, a timestamp from a client), decoded and verified
//! without a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::{PublicIdentity, Reader};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    if let Ok(id) = PublicIdentity::decode(&mut r) {
        let _ = id.verify();
        let _ = id.fingerprint();
        let _ = r.bytes(16);
        let _ = r.finish();
    }
});
