//! A control-socket request line: parsed without a panic (a request that
//! parses is one the daemon would act on), and round-trips; the daemon's
//! parser (with its fast path for `send`) agrees with the general one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::control::Request;

fuzz_target!(|data: &[u8]| {
    let general = serde_json::from_slice::<Request>(data);
    if let Ok(line) = std::str::from_utf8(data) {
        let fast = Request::parse(line);
        assert_eq!(fast.as_ref().ok(), general.as_ref().ok(), "{line}");
    }
    if let Ok(r) = general {
        let again = serde_json::to_vec(&r).expect("a parsed request serializes");
        let back: Request = serde_json::from_slice(&again).expect("and parses again");
        assert_eq!(back.command, r.command);
    }
});
