//! What a server sends inside a session: decoded without a panic, and
//! round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::wire::ServerToClient;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ServerToClient::decode(data) {
        assert_eq!(ServerToClient::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
