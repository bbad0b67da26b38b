//! A control-socket request line: parsed without a panic (a request that
//! parses is one the daemon would act on), and round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::control::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&r).expect("a parsed request serializes");
        let back: Request = serde_json::from_slice(&again).expect("and parses again");
        assert_eq!(back.command, r.command);
    }
});
