//! Certificates (binary and PEM), armor, keys and fingerprints: what a
//! node reads from a peer's hello, a file or `tern cert`. A certificate
//! that decodes encodes back to the same bytes (the format is strict).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_shared::{armor, cert, keys};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = cert::Cert::decode(data) {
        assert_eq!(c.encode(), data, "a certificate re-encodes to its bytes");
        let pem = c.to_pem();
        assert_eq!(
            cert::Cert::from_pem(&pem).map(|d| d.encode()).ok(),
            Some(c.encode())
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = cert::Cert::from_pem(text);
    let _ = cert::Cert::all_from_pem(text);
    if let Ok(blocks) = armor::decode_all(text) {
        for (label, bytes) in blocks {
            let again = armor::decode_one(&armor::encode(&label, &bytes), &label);
            assert_eq!(again.ok(), Some(bytes), "armor round trip");
        }
    }
    let _ = keys::NodeSecretKey::from_pem(text);
    let _ = keys::NodePublicKey::from_pem(text);
    let _ = keys::CaSecretKey::from_pem(text);
    let _ = text.parse::<cert::Fingerprint>();
    let _ = cert::validate_zone(text);
    let _ = cert::canonical_zone(text);
});
