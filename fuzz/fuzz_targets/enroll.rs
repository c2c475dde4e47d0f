//! Enrollment datagrams, both sides: a lighthouse opening a node's sealed
//! request, a node reading a refusal, and the JSON inside both.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_shared::enroll;

fuzz_target!(|data: &[u8]| {
    let _ = enroll::disabled_reason(data);
    let _ = enroll::request_key(data);
    let lighthouse = x25519_dalek::StaticSecret::from([7u8; 32]);
    let _ = enroll::open_request(data, &lighthouse);
    let _ = serde_json::from_slice::<enroll::EnrollRequest>(data);
    let _ = serde_json::from_slice::<enroll::EnrollReply>(data);
});
