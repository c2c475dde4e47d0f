//! Control messages inside a session (a peer with a valid certificate may
//! send anything): what decodes encodes and decodes to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_shared::control::{split_answer, ControlMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::decode(data) {
        if let Ok(encoded) = msg.encode() {
            let again = ControlMessage::decode(&encoded);
            assert_eq!(again.ok(), Some(msg), "control message round trip");
        }
    }
    let _ = split_answer(data);
});
