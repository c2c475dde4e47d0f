//! OIDC enrollment: the JWKS a provider serves and the ID tokens CI jobs
//! present (split at the first newline: JWKS, then token), checked in full.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tern_lighthouse_core::oidc;

fuzz_target!(|data: &[u8]| {
    let (jwks, token) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    let parsed = oidc::Jwks::parse(jwks);
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    let _ = oidc::peek(token);
    let _ = oidc::base64url_decode(token, true);
    if let Ok(jwks) = parsed {
        let _ = oidc::verify(
            token,
            &jwks,
            "https://issuer.example",
            "tern",
            1_800_000_000,
        );
    }
});
