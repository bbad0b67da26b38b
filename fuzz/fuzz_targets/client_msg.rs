//! What a client sends the server inside a session: decoded without a
//! panic, and round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::wire::ClientToServer;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ClientToServer::decode(data) {
        assert_eq!(ClientToServer::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
