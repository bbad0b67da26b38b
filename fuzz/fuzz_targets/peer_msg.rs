//! What a peer sends inside a session: keepalives, pings, flow frames
//! (chat, offers and directory listings, hashes, data, pauses) and flow
//! acknowledgements. Decoded without a panic, and round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::wire::PeerToPeer;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = PeerToPeer::decode(data) {
        assert_eq!(PeerToPeer::decode(&m.encode()).as_ref(), Ok(&m));
    }
});
