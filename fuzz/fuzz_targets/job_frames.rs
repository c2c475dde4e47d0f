//! The runner's job protocol: frames from a caller or a runner, one at a
//! time and as a stream cut anywhere. What decodes encodes and decodes to
//! the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_runner_core::protocol::{FrameReader, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode(data) {
        if let Ok(encoded) = msg.encode() {
            let again = Message::decode(&encoded[4..]);
            assert_eq!(again.ok(), Some(msg), "job frame round trip");
        }
    }
    // The same bytes as a stream, in two pieces.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut reader = FrameReader::new();
    for piece in [&data[..cut], &data[cut..]] {
        reader.push(piece);
        for _ in 0..64 {
            match reader.next_message() {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
});
