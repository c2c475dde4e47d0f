//! The datagram kinds on the UDP socket: classification, hellos and relay
//! envelopes, as any sender on the internet can make them. What decodes
//! encodes back to something that decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_shared::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::classify(data);
    if let Ok(hello) = wire::Hello::decode(data) {
        let encoded = hello.encode();
        let again = wire::Hello::decode(&encoded).map(|h| h.encode());
        assert_eq!(again.ok(), Some(encoded), "hello round trip");
    }
    for kind in [wire::TYPE_RELAY_REQUEST, wire::TYPE_RELAYED] {
        if let Ok(envelope) = wire::RelayEnvelope::decode(kind, data) {
            let encoded = envelope.encode(kind);
            let again = wire::RelayEnvelope::decode(kind, &encoded).map(|e| e.encode(kind));
            assert_eq!(again.ok(), Some(encoded), "relay envelope round trip");
        }
    }
});
