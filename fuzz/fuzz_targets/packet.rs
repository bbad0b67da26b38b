//! Any datagram: decoded without a panic; what decodes encodes to bytes
//! that decode to the same packet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::wire::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let again = p.encode();
        // (Padding is not kept: compare what it decodes to.)
        assert_eq!(Packet::decode(&again).as_ref(), Ok(&p));
    }
});
